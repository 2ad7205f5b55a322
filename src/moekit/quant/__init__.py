"""Weight-only quantisation: int8 per output channel and int4 in groups, for the routed experts
and optionally every other linear layer (formats.py: the stored layout; weight.py: packed
weights and their kernels; experts.py: quantised experts; build.py: quantising and loading
models)."""
