"""`moekit bench train --nproc P [--ep N]`: our training step on P processes of this machine
(data parallel with FSDP2, expert parallel over N) against the same step on one process, on
the same global batch, and the share of the step spent in the all-to-all exchanges.

The one-process step is timed before and after the P processes run (the machine's load can
change between them; both figures are reported). The P processes split the machine's cores
between them, so on a small machine little speed-up is expected: what this measures is the
cost of the split, above all the exchanges' time.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.model import build_model
from moekit.presets import get_preset
from moekit.training.config import TrainConfig
from moekit.training.optim import build_optimizer
from moekit.training.step import optimizer_step


@dataclass(frozen=True)
class ParallelTrainBench:
    """What `bench_train_parallel` measured. tokens_per_s_one: one process (before, after the
    split run); tokens_per_s: the P processes together (global batch tokens per step time);
    all_to_all_share: the mean over processes of the step time spent in the exchanges (0
    without expert parallelism); first_loss_one / first_loss: the loss of the first step on
    each side (the same global batch and weights: equal up to float rounding)."""

    preset: str
    batch_size: int
    seq_len: int
    nproc: int
    ep: int
    threads_per_process: int
    tokens_per_s_one: tuple[float, float]
    tokens_per_s: float
    all_to_all_share: float
    all_to_all_calls_per_step: float
    first_loss_one: float
    first_loss: float

    @property
    def speedup(self) -> float:
        """The P processes' tokens/s over the better of the one-process measurements."""
        return self.tokens_per_s / max(self.tokens_per_s_one)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"speedup": self.speedup}


def _batch(cfg_vocab: int, batch_size: int, seq_len: int, seed: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, cfg_vocab, (batch_size, seq_len + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def _time_steps(
    model: Any, opt: Any, batch: tuple[Any, Any], repeats: int, parallel: Any = None,
    timer: Any = None,
) -> tuple[list[float], float]:  # fmt: skip
    """Seconds of each of `repeats` optimizer steps after one untimed one, and the loss of the
    first step (before any update); `timer` (an ExchangeTimer) counts the timed steps only."""
    first = optimizer_step(model, opt, [batch], grad_accum=1, grad_clip=1.0, parallel=parallel)
    if timer is not None:
        timer.seconds, timer.calls = 0.0, 0
    times = []
    for _ in range(repeats):
        if parallel is not None:
            torch.distributed.barrier(group=parallel.world_group)
        t0 = time.perf_counter()
        optimizer_step(model, opt, [batch], grad_accum=1, grad_clip=1.0, parallel=parallel)
        times.append(time.perf_counter() - t0)
    return times, float(first["loss"])


def _one_process(
    preset: str, batch: tuple[Any, Any], repeats: int, seed: int
) -> tuple[float, float]:
    cfg = get_preset(preset)
    model = build_model(cfg, seed=seed)
    opt = build_optimizer(model, TrainConfig())
    times, loss = _time_steps(model, opt, batch, repeats)
    return batch[0].numel() / statistics.median(times), loss


def _worker(rank: int, world: int, port: int, ep: int, preset: str, batch: tuple[Any, Any],
            repeats: int, seed: int, threads: int, out: str) -> None:  # fmt: skip
    from moekit.parallel.apply import parallelize
    from moekit.parallel.expert import ExchangeTimer, ExpertParallelExperts
    from moekit.parallel.mesh import init_parallel

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(threads)
    parallel = init_parallel(ep)
    model = parallelize(build_model(get_preset(preset), seed=seed), parallel)
    timer = ExchangeTimer()
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            m.timer = timer
    opt = build_optimizer(model, TrainConfig())
    times, loss = _time_steps(model, opt, batch, repeats, parallel, timer)
    result = {"times": times, "loss": loss, "exchange_s": timer.seconds, "calls": timer.calls}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def bench_train_parallel(
    preset: str = "demo",
    batch_size: int = 16,
    seq_len: int = 256,
    nproc: int = 2,
    ep: int = 1,
    repeats: int = 5,
    seed: int = 0,
    timeout: float = 1800,
) -> ParallelTrainBench:
    """Tokens/s of one optimizer step on one process and on `nproc` processes (expert
    parallel over `ep`) on the same `batch_size` x `seq_len` random batch; see the module
    docstring. Returns a ParallelTrainBench."""
    from moekit.parallel.launch import run_processes
    from moekit.parallel.mesh import check_sizes

    cfg = get_preset(preset)
    check_sizes(nproc, ep, cfg.moe.num_experts if cfg.moe is not None else None)
    if batch_size % nproc:
        raise ValueError(f"--batch-size {batch_size} does not split over {nproc} processes")
    batch = _batch(cfg.vocab_size, batch_size, seq_len, seed)
    before, loss_one = _one_process(preset, batch, repeats, seed)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory() as out:
        run_processes(
            _worker, nproc, ep, preset, batch, repeats, seed, threads, out, timeout=timeout
        )
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nproc)]
    after, _ = _one_process(preset, batch, repeats, seed)
    # A step ends when its slowest process does.
    step = statistics.median(max(r["times"][i] for r in ranks) for i in range(repeats))
    return ParallelTrainBench(
        preset=preset,
        batch_size=batch_size,
        seq_len=seq_len,
        nproc=nproc,
        ep=ep,
        threads_per_process=threads,
        tokens_per_s_one=(before, after),
        tokens_per_s=batch_size * seq_len / step,
        all_to_all_share=statistics.mean(r["exchange_s"] / sum(r["times"]) for r in ranks),
        all_to_all_calls_per_step=ranks[0]["calls"] / repeats,
        first_loss_one=loss_one,
        first_loss=ranks[0]["loss"],
    )
