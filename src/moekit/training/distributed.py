"""A training run on several processes (`torchrun`, or `moekit train --nproc`): joining the
run, what only the main process does, and writing the ordinary model directory from a split
model.

Every process builds the same model from the same seed and reads the same global batches
(the data stream is deterministic and resumable); `moekit.parallel.parallelize` then splits
the model (experts over `train.ep` processes, FSDP2 over all of them) and each process takes
its own rows of every batch (`moekit.parallel.data.my_rows`). Only the main process (rank 0)
writes metrics, progress, reports and the model directory; checkpoints are written by all
of them (each its own shards).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moekit.config import ModelConfig
from moekit.model_dir import ModelDir
from moekit.parallel.checkpoint import full_state_dict
from moekit.parallel.mesh import Parallel, check_sizes, init_parallel
from moekit.training.config import RunConfig


def launched_world() -> int:
    """How many processes this one was launched among (torchrun's WORLD_SIZE; 1 alone)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_parallel(cfg: RunConfig, device: torch.device) -> Parallel | None:
    """Join the run this process was launched into and lay it out with `train.ep`; None when
    it runs alone. Refuses, before anything is set up, a split the run cannot take."""
    world = launched_world()
    check_split(cfg, world)
    if world == 1:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return init_parallel(cfg.train.ep, device=device)


def check_split(cfg: RunConfig, world: int) -> None:
    """Refuse a run on `world` processes that `cfg` cannot take, naming what to change."""
    tc = cfg.train
    if world == 1:
        if tc.ep > 1:
            raise ValueError(
                f"train.ep={tc.ep} splits the experts over {tc.ep} processes, but this run has "
                f"one: start it with `moekit train --nproc {tc.ep} ...` or under torchrun, or "
                "set train.ep=1 to run it on one process"
            )
        return
    experts = cfg.model.moe.num_experts if cfg.model.moe is not None else None
    if experts is None and tc.ep > 1:
        raise ValueError(f"train.ep={tc.ep}: the model has no routed experts to split")
    check_sizes(world, tc.ep, experts)
    if tc.batch_size % world:
        raise ValueError(
            f"train.batch_size={tc.batch_size} does not split evenly over {world} processes: "
            f"make it a multiple of {world} (each process takes batch_size / {world} rows of "
            "every batch)"
        )
    dp = world // tc.ep
    if cfg.model.moe is not None and tc.ep > 1 and dp > 1 and tc.data_parallel == "fsdp":
        sizes = {"model.moe.expert_hidden": cfg.model.moe.expert_hidden, "model.dim": cfg.model.dim}
        for name, size in sizes.items():
            if size % dp:
                raise ValueError(
                    f"FSDP2 shards each expert's rows over the {dp} replicas of the experts, so "
                    f"{name}={size} must be a multiple of {dp}; or use "
                    "train.data_parallel=ddp (replicated experts)"
                )
    if cfg.finetune is not None:
        raise ValueError(
            "fine-tuning runs on one process; several processes train from a model config "
            "(pre-training or continued pre-training with train.init_from)"
        )


@contextlib.contextmanager
def main_first(parallel: Parallel | None) -> Iterator[None]:
    """Run the block on the main process first, then on the others (what it writes to shared
    places, such as the tokenizer cache, is then there for them to read)."""
    if parallel is None:
        yield
        return
    if not parallel.is_main:
        dist.barrier(group=parallel.world_group)
    yield
    if parallel.is_main:
        dist.barrier(group=parallel.world_group)


def save_model_dir(model: Any, cfg: ModelConfig, run_dir: Path, parallel: Parallel) -> None:
    """The whole model gathered from its shards and written by the main process as the
    ordinary model directory (config.json and safetensors); every process must call it."""
    state = full_state_dict(model, parallel)
    if state is not None:
        directory = ModelDir(run_dir)
        directory.save_weights(state)
        directory.save_config(cfg)
    dist.barrier(group=parallel.world_group)


class NoMetrics:
    """What the processes other than the main one log metrics to: nothing."""

    path = Path(os.devnull)

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def launch(nproc: int, moekit_args: list[str]) -> int:
    """Run `moekit <moekit_args>` in `nproc` processes on this machine under torchrun
    (`torch.distributed.run --standalone`: a rendezvous on a free local port), and return its
    exit status (non-zero when any process failed; torchrun then stops the others)."""
    import subprocess
    import sys

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "moekit", *moekit_args,
    ]  # fmt: skip
    env = dict(os.environ)
    # Each process gets an equal share of the cores (torchrun would otherwise pin 1 thread).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env, check=False).returncode
