"""Looking inside models: parameter accounting, routing and specialisation analysis."""
