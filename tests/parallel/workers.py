"""Functions run in each process of the multi-process tests (imported by the spawned
processes, so kept free of pytest)."""

from __future__ import annotations

import os
from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.model import build_model


def tiny_config(num_experts: int = 8, **moe: object) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=64,
             max_seq_len=32, moe=dict(num_experts=num_experts, top_k=2, expert_hidden=16, **moe))
    )  # fmt: skip


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)


def _loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    out = model(rows[:, :-1])
    return F.cross_entropy(out.logits.flatten(0, 1), rows[:, 1:].flatten()) + out.aux_loss


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor's whole value


def same_steps(
    rank: int, world: int, port: int, ep: int, moe: dict[str, object], data_parallel: str = "fsdp"
) -> None:
    """A few AdamW steps of a model split over `world` processes (expert parallel size `ep`,
    FSDP2 over the rest) against the same steps of the whole model in this process on the
    whole batch: the loss, every gradient, every updated weight and the routers' biases
    agree (each process compares its own shard of the experts)."""
    import torch.distributed as dist

    from moekit.parallel.apply import parallelize
    from moekit.parallel.balance import global_counts
    from moekit.parallel.mesh import init_parallel

    join(rank, world, port)
    parallel = init_parallel(ep)
    cfg = tiny_config(**moe)  # type: ignore[arg-type]
    rows_per_rank = 2
    data = torch.randint(0, cfg.vocab_size, (world * rows_per_rank, 17),
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    mine = data[rank * rows_per_rank : (rank + 1) * rows_per_rank]
    whole = build_model(cfg, seed=0)
    split = parallelize(build_model(cfg, seed=0), parallel, data_parallel=data_parallel)
    opt_whole = torch.optim.AdamW(whole.parameters(), lr=1e-2)
    opt_split = torch.optim.AdamW(split.parameters(), lr=1e-2)
    L = cfg.moe.num_experts // ep if cfg.moe else 0

    def mine_of(name: str, t: torch.Tensor) -> torch.Tensor:
        if ".experts." in name and ep > 1:  # this process's experts
            return t[parallel.ep_rank * L : (parallel.ep_rank + 1) * L]
        return t

    for step in range(3):
        loss_whole, loss_split = _loss(whole, data), _loss(split, mine)
        loss_whole.backward()
        loss_split.backward()
        mean = loss_split.detach().clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(
            mean / world, loss_whole.detach(), atol=1e-5, rtol=1e-5, msg=f"step {step}"
        )
        reference = dict(whole.named_parameters())
        for name, p in split.named_parameters():
            assert p.grad is not None, name
            expected = mine_of(name, reference[name].grad)  # type: ignore[arg-type]
            torch.testing.assert_close(_full(p.grad), expected, atol=2e-5, rtol=1e-4, msg=name)
        opt_whole.step()
        opt_split.step()
        opt_whole.zero_grad()
        opt_split.zero_grad()
        # The aux-loss-free bias step, from counts of the global batch on every process.
        with torch.no_grad():
            whole_out, split_out = whole(data[:, :-1]), split(mine[:, :-1])
        whole.update_router_biases({i: s.tokens_per_expert for i, s in whole_out.moe_stats.items()})
        counts = global_counts(
            {i: s.tokens_per_expert for i, s in split_out.moe_stats.items()}, parallel
        )
        split.update_router_biases(counts)
    # The weights after the steps, to 1% of one step (lr 1e-2): AdamW divides each gradient
    # by its own running size, so an element whose gradient is near zero moves by up to lr
    # whatever its sign, and the last bits of the two sums (a different CPU's kernels) can
    # show there as ~3e-5 where the gradients above agreed to 2e-5. A missed or doubled
    # update of a shard would show as ~1e-2.
    reference = dict(whole.named_parameters())
    for name, p in split.named_parameters():
        torch.testing.assert_close(
            _full(p.data), mine_of(name, reference[name].data), atol=1e-4, rtol=1e-4, msg=name
        )
    for (name, b), (_, expected) in zip(split.named_buffers(), whole.named_buffers(), strict=True):
        if "selection_bias" in name:
            torch.testing.assert_close(b, expected, msg=name)
    dist.destroy_process_group()


# Planted routing: the experts each process's copies go to (8 experts over 2 processes:
# 0-3 live on process 0, 4-7 on process 1). Process 0 sends nothing to itself; expert 1, 2
# and 4 receive nothing.
PLANTED = {0: [5, 5, 5, 7, 7], 1: [0, 0, 3, 6, 6, 6, 6]}


def planted_routing(rank: int, world: int, port: int) -> None:
    """Each process's copies, sent to the experts of `PLANTED`, come back in their own rows
    with the output of their own expert, and the gradients flow back the same way: checked
    against the whole layer's reference backend computed in this process."""
    import torch.distributed as dist

    from moekit.moe.experts import Experts, eager_experts
    from moekit.parallel.expert import EXPERT_PARALLEL, shard_experts
    from moekit.parallel.mesh import init_parallel

    join(rank, world, port)
    parallel = init_parallel(ep=world)
    model = build_model(tiny_config(num_experts=8), seed=0)
    whole = model.moe_layers()[0].experts
    reference = Experts(8, whole.dim, whole.hidden)
    reference.load_state_dict(whole.state_dict())
    shard_experts(model, parallel)
    split = model.moe_layers()[0].experts

    def inputs(r: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(10 + r)
        expert_S = torch.tensor(PLANTED[r])
        x_SD = torch.randn(len(expert_S), whole.dim, generator=g, requires_grad=True)
        scale_S = torch.rand(len(expert_S), generator=g)
        out_grad = torch.randn(len(expert_S), whole.dim, generator=g)
        return x_SD, expert_S, torch.bincount(expert_S, minlength=8), scale_S, out_grad

    x_SD, expert_S, counts_E, scale_S, out_grad = inputs(rank)
    y_SD = split.compute(EXPERT_PARALLEL, x_SD, expert_S, counts_E, scale_S)
    (y_SD * out_grad).sum().backward()
    for r in range(world):  # the whole layer sees both processes' copies
        xr, er, cr, sr, gr = inputs(r)
        yr = eager_experts(xr, er, cr, sr, reference)
        (yr * gr).sum().backward()
        if r == rank:
            torch.testing.assert_close(y_SD, yr)
            torch.testing.assert_close(x_SD.grad, xr.grad)
    rows = slice(parallel.ep_rank * 4, (parallel.ep_rank + 1) * 4)
    for name, p in split.named_parameters():
        torch.testing.assert_close(p.grad, getattr(reference, name).grad[rows], msg=name)
    dist.destroy_process_group()


def _batch(step: int, rows: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, 17), generator=torch.Generator().manual_seed(100 + step))


def _train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int
) -> None:
    for step in steps:
        rows = _batch(step, 4, 96)
        mine = rows[rank * (4 // world) : (rank + 1) * (4 // world)]
        _loss(model, mine).backward()
        opt.step()
        opt.zero_grad()


def reshard(
    rank: int, world: int, port: int, ep: int, root: str, load: str | None, save: str,
    data_parallel: str = "fsdp",
) -> None:  # fmt: skip
    """Load the checkpoint `load` (if any) saved under another split, check the weights
    against the ones saved with it, train one more step, and save a checkpoint and the
    gathered weights under `save`."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from moekit.parallel.apply import parallelize
    from moekit.parallel.checkpoint import full_state_dict, load_sharded, save_sharded
    from moekit.parallel.mesh import init_parallel

    join(rank, world, port)
    parallel = init_parallel(ep)
    cfg = tiny_config(z_loss_weight=1e-3)
    model = parallelize(  # other weights than the saved ones
        build_model(cfg, seed=7 + world), parallel, data_parallel=data_parallel
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    base = __import__("pathlib").Path(root)
    if load is None:
        _train(model, opt, range(2), rank, world)
    else:
        load_sharded(base / load / "dcp", model, opt, parallel)
        full = full_state_dict(model, parallel)
        if full is not None:
            saved = load_file(str(base / load / "weights.safetensors"))
            assert full.keys() == saved.keys()
            for name, t in full.items():
                torch.testing.assert_close(t, saved[name], rtol=0, atol=0, msg=name)
        _train(model, opt, range(2, 3), rank, world)
    save_sharded(base / save / "dcp", model, opt, parallel)
    full = full_state_dict(model, parallel)
    if full is not None:
        save_file(
            {k: v.contiguous() for k, v in full.items()}, str(base / save / "weights.safetensors")
        )
    dist.barrier()
    dist.destroy_process_group()


def one_process_load(root: str, load: str) -> dict[str, torch.Tensor]:
    """Load the checkpoint `load` into one process's whole model (no process group)."""
    from pathlib import Path

    from moekit.parallel.checkpoint import load_sharded

    model = build_model(tiny_config(z_loss_weight=1e-3), seed=99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_sharded(Path(root) / load / "dcp", model, opt, None)
    return model.state_dict()


def straight_steps(seed: int, steps: range) -> dict[str, torch.Tensor]:
    """The whole model trained `steps` in one process from `build_model(seed=seed)`."""
    model = build_model(tiny_config(z_loss_weight=1e-3), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, steps, 0, 1)
    return model.state_dict()


def train_run(
    rank: int, world: int, port: int, out: str, overrides: list[str], stop_after: int | None,
    resume: bool,
) -> None:  # fmt: skip
    """`moekit.train` of the tiny test run in each process (`stop_after`, `resume` as there)."""
    join(rank, world, port)
    train_here(out, overrides, resume=resume, stop_after=stop_after)


def train_here(
    out: str,
    overrides: list[str],
    *,
    resume: bool,
    stop_after: int | None = None,
    observer: Any = None,
) -> None:
    """`moekit.train` of the tiny test run in this process."""
    from moekit.training.config import resolve_run_config
    from moekit.training.trainer import train
    from tests.conftest import TINY_RUN

    cfg = resolve_run_config(preset="debug", overrides=[*TINY_RUN, *overrides])
    train(
        cfg,
        out,
        resume=resume,
        verbose=False,
        report=False,
        stop_after=stop_after,
        observer=observer,
    )


def split_generation(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """Greedy and sampled generation with the experts split over the processes (the main
    process generates, the others serve their experts); it writes what it generated (tokens
    and log-probabilities) to `out`."""
    import json
    from pathlib import Path

    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams
    from moekit.parallel.inference import release_experts, serve_experts, split_model
    from moekit.parallel.mesh import close_parallel, init_parallel

    join(rank, world, port)
    generator = Generator.from_dir(model_dir)
    parallel = init_parallel(ep=world)
    split_model(generator.model, parallel)
    if rank != 0:
        assert serve_experts(generator.model, parallel) > 0
        close_parallel()
        return

    # A forward pass that fails on the main process part way (here in the second block's
    # attention, after the first MoE layer's exchange) leaves the others ready for the next.
    def fail(*args: object) -> None:
        raise RuntimeError("injected")

    hook = generator.model.blocks()[1].attn.register_forward_pre_hook(fail)
    try:
        generator.generate("The cat", SamplingParams(temperature=0, max_new_tokens=2))
    except RuntimeError as e:
        assert "injected" in str(e)
    hook.remove()
    prompts = ["The cat", "def f(x):\n    return"]
    result = {}
    for name, params in {
        "greedy": SamplingParams(temperature=0, max_new_tokens=12),
        "sampled": SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, seed=5),
    }.items():
        done = generator.generate(prompts, params)
        result[name] = [[(t.id, t.logprob) for t in c.tokens] for c in done]
    release_experts(parallel)
    close_parallel()
    Path(out).write_text(json.dumps(result))


def one_dies(rank: int, world: int, port: int, out: str) -> None:
    """Training steps until process 1 dies (exits without a word) at its third step; the
    others must fail with an error instead of waiting for it, and write the error to `out`."""
    import time
    from pathlib import Path

    from moekit.parallel.apply import parallelize
    from moekit.parallel.mesh import init_parallel

    join(rank, world, port)
    parallel = init_parallel(ep=world)
    model = parallelize(build_model(tiny_config(), seed=0), parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    t0 = time.monotonic()
    try:
        for step in range(1000):
            if rank == 1 and step == 2:
                os._exit(3)
            _train(model, opt, range(step, step + 1), rank, world)
    except Exception as e:  # what the survivor sees
        Path(out).write_text(f"{time.monotonic() - t0:.1f}s {type(e).__name__}: {e}")


def signalled(rank: int, world: int, port: int, out: str) -> None:
    """A long run in which only process 1 receives SIGTERM: every process must save the same
    step and stop with TrainingInterruptedError (writing the step to out/rank{N})."""
    import signal
    import threading
    import time
    from pathlib import Path

    from moekit.training.errors import TrainingInterruptedError
    from moekit.training.events import StepDone, TrainingObserver

    started = Path(out, "step3")

    class MarkStep3(TrainingObserver):  # observers run on the main process only
        def stepped(self, event: StepDone) -> None:
            if event.step == 3:
                started.touch()

    def signal_once_training() -> None:
        """SIGTERM to this process once the run has made three steps: during training,
        whatever the time setting up took (a machine under load takes longer)."""
        while not started.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    join(rank, world, port)
    if rank == 1:
        threading.Thread(target=signal_once_training, daemon=True).start()
    overrides = ["train.ep=2", "train.max_steps=100000"]
    try:
        train_here(
            str(Path(out) / "run"),
            overrides,
            resume=False,
            observer=MarkStep3() if rank == 0 else None,
        )
    except TrainingInterruptedError as e:
        Path(out, f"rank{rank}").write_text(str(e.step))


def padding_only(rank: int, world: int, port: int) -> None:
    """One process's rows are all padding: the step still completes on every process."""
    import torch.distributed as dist

    from moekit.parallel.apply import parallelize
    from moekit.parallel.mesh import init_parallel
    from moekit.training.step import optimizer_step

    join(rank, world, port)
    parallel = init_parallel(ep=world)
    model = parallelize(build_model(tiny_config(), seed=0), parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = torch.randint(1, 96, (4, 17), generator=torch.Generator().manual_seed(3))
    rows[2:] = 0  # process 1's rows
    out = optimizer_step(
        model, opt, [(rows[:, :-1], rows[:, 1:])], grad_accum=1, grad_clip=1.0, pad_id=0,
        parallel=parallel,
    )  # fmt: skip
    assert out["finite"] and out["tokens"] == int((rows[:, :-1] != 0).sum())
    dist.destroy_process_group()
