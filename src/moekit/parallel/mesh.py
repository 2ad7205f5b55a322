"""The processes of a run and how they are grouped: data parallel x expert parallel.

A world of W processes with expert-parallel size P is laid out as a (W / P, P) grid, PyTorch's
`DeviceMesh` with dimensions "dp" and "ep": the P processes of one row share one copy of the
model's routed experts, each holding E / P of them (tokens travel between them with
all-to-all); the W / P rows are data-parallel replicas of those experts. Everything else in
the model (attention, embeddings, routers, shared experts) is replicated over all W
processes, which are its data-parallel group.

Launch with `torchrun` (which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) and call
`init_parallel`; the backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# How long a collective waits for the other processes before failing. A process that dies
# closes its connections, which ends the others' collectives at once; this bounds the wait
# for one that hangs, and also what the main process may do alone while the others wait
# (preparing data, writing the report): generous.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data x expert parallel run.

    rank, world: this process and the number of processes. ep: the expert-parallel size (the
    processes sharing one copy of the experts); dp = world / ep. ep_rank: this process's
    index within its expert-parallel group (it holds experts [ep_rank * E/ep, ...)); dp_rank:
    its index among the replicas of its experts. mesh: the ("dp", "ep") device mesh;
    world_mesh: all processes as one dimension ("world"), the data-parallel group of the
    replicated weights.
    """

    rank: int
    world: int
    ep: int
    mesh: DeviceMesh
    world_mesh: DeviceMesh

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The replicas of this process's experts (one per row of the grid)."""
        return self.mesh.get_group("dp")

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group("world")

    @property
    def is_main(self) -> bool:
        """Whether this process writes metrics, reports, progress and the model directory."""
        return self.rank == 0


def check_sizes(world: int, ep: int, num_experts: int | None = None) -> None:
    """Refuse an expert-parallel size that does not divide the world or the experts."""
    if ep < 1:
        raise ValueError(f"the expert-parallel size must be at least 1, got {ep}")
    if world % ep:
        raise ValueError(
            f"the expert-parallel size ({ep}) must divide the number of processes ({world})"
        )
    if num_experts is not None and num_experts % ep:
        raise ValueError(
            f"the expert-parallel size ({ep}) must divide the number of routed experts "
            f"({num_experts}): each process holds the same number of experts"
        )


def init_parallel(
    ep: int = 1,
    *,
    device: torch.device | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> Parallel:
    """Join the run this process was launched into (torchrun's environment variables, or a
    process group already initialised) and lay it out with expert-parallel size `ep`."""
    device = device or torch.device("cpu")
    if not dist.is_initialized():
        missing = [
            v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
        ]
        if missing:
            raise RuntimeError(
                "not launched as one of several processes (missing "
                f"{', '.join(missing)}): start with `torchrun --nproc-per-node N -m moekit ...`"
            )
        # On CUDA, NCCL for tensors on the GPU and gloo for the small CPU tensors some
        # collectives exchange (copy counts, flags, norms).
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_sizes(world, ep)
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
    return Parallel(rank=rank, world=world, ep=ep, mesh=mesh, world_mesh=world_mesh)


def close_parallel() -> None:
    """Leave the run: destroy the process group (its backend's threads stop and its
    connections close here, not in the interpreter's teardown, where a thread still running
    aborts the process). Nothing to do when no group is initialised."""
    if dist.is_initialized():
        dist.destroy_process_group()
