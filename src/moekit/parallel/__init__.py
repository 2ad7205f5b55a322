"""Parallelism applied to a built model with PyTorch's own distributed stack (torch.distributed):
data parallelism (FSDP2 or DDP), expert parallelism (routed experts sharded over a group of
processes, tokens exchanged with all-to-all), process groups and meshes, distributed
checkpoints, and the planner that sizes a split from a config alone. The model files hold no
distributed code: everything here wraps or modifies a model after `build_model`."""
