"""Looking inside models: the routing trace, specialisation, consistency, analyze, doctor."""
