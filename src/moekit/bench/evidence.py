"""`moekit evidence`: the field's core claims about Mixture-of-Experts, reproduced at a small
scale on the CPU and written up as one report (moekit.bench.evidence_report).

Every comparison trains its variants on the same data, for the same steps and tokens, with
the same seeds, and compares their validation loss (lower is better) at the end, seed by
seed; a difference counts only when every seed shows it and it is larger than the
seed-to-seed spread of the per-seed differences (`verdict`). The variants, each a change
to one base MoE (token choice, top-2 of 8, load-balancing loss, dropless), at equal active
parameters where the claim is about parameters:

- moe_vs_dense: the MoE vs a dense model with its active parameters;
- fine_grained: 4x finer experts (a quarter the width, four times as many) with one shared
  expert of that width, routed top-k chosen so the active width is the coarse MoE's;
- aux_free: aux-loss-free balancing (a selection bias, no balance loss) vs the balance loss,
  with the routing imbalance over the run;
- expert_choice: expert-choice routing (capacity factor = top-k) vs token choice;
- upcycling: a dense model trained half the steps, upcycled into the MoE and trained the
  other half, vs the MoE from scratch for all the steps;
- capacity: a capacity factor of 1.0 (copies over it dropped) vs dropless, with the drop rate;
- topk_inference: the trained base MoE evaluated with 1 .. 2k experts per token (quality) and
  its decode speed per k (moekit.bench.topk);
- hierarchical: hierarchical routing (groups, then experts in the chosen groups) vs flat
  top-k at equal active parameters and expert count, where the model supports it.

Runs shared between comparisons (the base MoE) train once per seed.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.training.compare import dense_with_params
from moekit.training.config import RunConfig

BUDGETS = ("small", "full")


@dataclass(frozen=True)
class Budget:
    """The base run every variant changes: model, data and train sections, and the seeds."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    seeds: tuple[int, ...] = (0, 1)


def budget(name: str) -> Budget:
    """ "small": a 2-layer model for 300 steps on a tenth of the builtin corpus (the whole
    suite in under 20 minutes on 2 cores); "full": the demo model with the demo recipe's
    settings for half its steps, 300 (about 80 minutes on 2 cores with `jobs=2`; the
    recipe's 600 steps double that)."""
    from moekit.presets import get_preset

    if name == "small":
        model = dict(vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     ffn_hidden=256, max_seq_len=128,
                     moe=dict(num_experts=8, top_k=2, expert_hidden=64,
                              z_loss_weight=0.001))  # fmt: skip
        train = dict(max_steps=300, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=30,
                     eval_every=100, eval_batches=8, log_every=10)  # fmt: skip
        return Budget("small", model, {"max_chars_per_domain": 200_000}, train)
    if name == "full":
        train = dict(max_steps=300, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=60,
                     min_lr_ratio=0.1, eval_every=100, eval_batches=8, log_every=10)  # fmt: skip
        return Budget("full", get_preset("demo").to_dict(), {}, train)
    raise ValueError(f"budget {name!r} is unknown: choose from {', '.join(BUDGETS)}")


# ---- variants --------------------------------------------------------------------------------

Change = Callable[[dict[str, Any]], dict[str, Any]]  # a model section -> the variant's


def _moe(change: dict[str, Any]) -> Change:
    def apply(model: dict[str, Any]) -> dict[str, Any]:
        return {**model, "moe": {**model["moe"], **change}}

    return apply


def _dense_active(model: dict[str, Any]) -> dict[str, Any]:
    cfg = ModelConfig.from_dict(copy.deepcopy(model))
    return dense_with_params(cfg, count_params(cfg).active).to_dict()


def _fine_shared(model: dict[str, Any]) -> dict[str, Any]:
    moe = model["moe"]
    width = moe["expert_hidden"] // 4
    active = moe["top_k"] * moe["expert_hidden"]  # the coarse MoE's active expert width
    return _moe(
        {"num_experts": 4 * moe["num_experts"], "expert_hidden": width,
         "num_shared_experts": 1, "shared_expert_hidden": width,
         "top_k": active // width - 1}
    )(model)  # fmt: skip


def _expert_choice(model: dict[str, Any]) -> dict[str, Any]:
    k = model["moe"]["top_k"]
    return _moe({"router": "expert_choice", "capacity_factor": float(k), "aux_loss_weight": 0.0,
                 "z_loss_weight": 0.0})(model)  # fmt: skip


VARIANTS: dict[str, Change] = {
    "moe": lambda model: model,
    "dense_active": _dense_active,
    "fine_shared": _fine_shared,
    "aux_free": _moe({"aux_loss_weight": 0.0, "bias_update_rate": 1e-3}),
    "expert_choice": _expert_choice,
    "capacity_1.0": _moe({"capacity_factor": 1.0}),
    # two groups, one chosen per token, top_k experts inside it: the same experts and k
    "hierarchical": _moe({"router": "hierarchical", "router_groups": 2, "group_top_k": 1}),
}


@dataclass(frozen=True)
class Comparison:
    """A claim: `variant` does better than (or as well as) `baseline`."""

    key: str
    title: str
    variant: str
    baseline: str = "moe"


COMPARISONS = (
    Comparison("moe_vs_dense", "MoE vs dense at equal active parameters", "moe", "dense_active"),
    Comparison(
        "fine_grained",
        "Fine-grained + shared experts vs coarse, equal active parameters",
        "fine_shared",
    ),
    Comparison("aux_free", "Aux-loss-free balancing vs the load-balancing loss", "aux_free"),
    Comparison("expert_choice", "Expert choice vs token choice routing", "expert_choice"),
    Comparison("upcycling", "Upcycling a dense model vs the MoE from scratch", "upcycled"),
    Comparison("capacity", "Capacity factor 1.0 vs dropless", "capacity_1.0"),
)


# ---- runs ------------------------------------------------------------------------------------


@dataclass
class RunFigures:
    """One trained run: final validation loss, its curve, balance and drops, time."""

    variant: str
    seed: int
    val_loss: float
    curve: list[dict[str, float]]
    imbalance: list[dict[str, float]]  # per log step: mean over MoE layers of max/mean load
    drop_rate: float  # copies dropped at capacity / copies routed, over the run
    seconds: float
    total_params: int
    active_params: int


def run_config(b: Budget, model: dict[str, Any], seed: int, **train: Any) -> RunConfig:
    """A variant's run: the budget's recipe with `seed`, checkpointed at every evaluation
    (so an interrupted suite resumes its runs where they stopped)."""
    every = b.train.get("eval_every") or b.train["max_steps"]
    return RunConfig.from_dict(
        {
            "model": model,
            "data": b.data,
            "train": {**b.train, "seed": seed, "save_every": every,
                      "keep_last": 1, "samples": [], **train},
        }
    )  # fmt: skip


def _train_once(cfg: RunConfig, out: Path, verbose: bool) -> None:
    """Train `cfg` into `out` unless a run there has finished; a run that stopped at a
    checkpoint continues from it (exactly); one that stopped before its first starts again."""
    from moekit.training.checkpoint import newest_checkpoint
    from moekit.training.trainer import train

    saved = newest_checkpoint(out) if out.is_dir() else None
    if saved is not None and saved.step >= cfg.train.max_steps and ModelDir(out).is_model():
        return
    train(cfg, out, resume=saved is not None, verbose=verbose, report=False)


def figures(run_dir: Path, variant: str, seed: int) -> RunFigures:
    """The figures of a finished run, read from its metrics and config."""
    records = ModelDir(run_dir).read_metrics()
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    trains = [r for r in records if r.get("kind") == "train"]
    if not evals:
        raise ValueError(f"{run_dir}: the run made no evaluation")
    cfg = ModelDir(run_dir).config()
    imbalance, dropped, routed, previous = [], 0, 0, 0
    k = cfg.moe.top_k if cfg.moe is not None else 0
    for r in trains:
        layers = r.get("routing") or {}
        if layers:
            mean = statistics.fmean(v["imbalance"] for v in layers.values())
            imbalance.append({"step": r["step"], "imbalance": mean})
            dropped += sum(int(v.get("dropped", 0)) for v in layers.values())
            routed += (r["tokens"] - previous) * k * len(layers)
        previous = r["tokens"]
    pc = count_params(cfg)
    return RunFigures(
        variant, seed, float(evals[-1]["val_loss"]),
        [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]} for r in evals],
        imbalance, dropped / routed if routed else 0.0, float(evals[-1].get("elapsed_s", 0.0)),
        pc.total, pc.active,
    )  # fmt: skip


def train_variant(
    b: Budget, variant: str, seed: int, out: Path, *, verbose: bool = False
) -> RunFigures:
    """Train `variant` with `seed` into `out` (a finished run there is read, not retrained;
    an interrupted one continues)."""
    if variant == "upcycled":
        _upcycled(b, seed, out, verbose)
    else:
        _train_once(run_config(b, VARIANTS[variant](b.model), seed), out, verbose)
    result = figures(out, variant, seed)
    if variant == "upcycled":  # one curve over both phases, in steps of the whole run
        dense = figures(out.parent / f"{out.name}-dense", "dense", seed)
        half, tokens = dense.curve[-1]["step"], dense.curve[-1]["tokens"]
        result.curve = dense.curve + [
            {**p, "step": p["step"] + half, "tokens": p["tokens"] + tokens} for p in result.curve
        ]
        result.seconds += dense.seconds
    return result


def _upcycled(b: Budget, seed: int, out: Path, verbose: bool) -> None:
    """A dense model (MLP as wide as an expert) for half the steps, upcycled into the base
    MoE, trained the other half (its loss curve starts where the dense model's ends)."""
    from moekit.bench.upcycle import dense_for_upcycling
    from moekit.finetune.upcycle import upcycle

    moe_cfg = ModelConfig.from_dict(copy.deepcopy(b.model))
    assert moe_cfg.moe is not None
    half = max(1, b.train["max_steps"] // 2)
    dense_dir, start_dir = out.parent / f"{out.name}-dense", out.parent / f"{out.name}-start"
    dense = dense_for_upcycling(moe_cfg, 1)
    _train_once(run_config(b, dense.to_dict(), seed, max_steps=half), dense_dir, verbose)
    if not ModelDir(start_dir).is_model():
        upcycle(dense_dir, start_dir, num_experts=moe_cfg.moe.num_experts,
                top_k=moe_cfg.moe.top_k, seed=seed, aux_loss_weight=moe_cfg.moe.aux_loss_weight,
                z_loss_weight=moe_cfg.moe.z_loss_weight)  # fmt: skip
    start = ModelDir(start_dir).config().to_dict()
    cfg = run_config(b, start, seed, max_steps=b.train["max_steps"] - half,
                     warmup_steps=0, init_from=str(start_dir))  # fmt: skip
    _train_once(cfg, out, verbose)


def train_all(
    b: Budget,
    tasks: list[tuple[str, int]],
    runs_dir: Path,
    *,
    jobs: int = 1,
    say: Callable[[str], None] = print,
) -> dict[tuple[str, int], RunFigures]:
    """Train every (variant, seed) of `tasks` into `runs_dir`/VARIANT-sSEED. With `jobs` > 1,
    up to `jobs` runs at once, each in a process of its own with an equal share of this
    process's threads (on a CPU, two one-thread runs finish sooner than one two-thread run
    after the other: small models do not keep two threads busy)."""
    import torch

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid: must be a whole number >= 1")
    runs: dict[tuple[str, int], RunFigures] = {}
    if jobs == 1 or len(tasks) < 2:
        for variant, seed in tasks:
            say(f"training {variant}, seed {seed} ...")
            runs[variant, seed] = train_variant(b, variant, seed, runs_dir / f"{variant}-s{seed}")
        return runs
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:  # fmt: skip
        pending: dict[Future[RunFigures], tuple[str, int]] = {}
        say(f"training {len(tasks)} runs, {jobs} at a time ({threads} thread(s) each)")
        for variant, seed in tasks:
            path = runs_dir / f"{variant}-s{seed}"
            pending[pool.submit(train_variant, b, variant, seed, path)] = (variant, seed)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                variant, seed = pending.pop(future)
                try:
                    runs[variant, seed] = result = future.result()
                except BaseException:
                    for other in pending:  # those not started yet; running ones finish
                        other.cancel()
                    raise
                say(f"finished {variant}, seed {seed}: validation loss {result.val_loss:.4f}")
    return runs


# ---- verdicts --------------------------------------------------------------------------------


@dataclass
class Verdict:
    """A comparison's outcome: each side's mean final loss over the seeds, the difference
    (variant - baseline; negative: the variant is better), the seed spread and the reading."""

    key: str
    title: str
    variant: str
    baseline: str
    variant_loss: float
    baseline_loss: float
    difference: float
    spread: float | None
    reading: str
    runs: list[RunFigures] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs": [asdict(r) for r in self.runs]}


def verdict(c: Comparison, variant: list[RunFigures], baseline: list[RunFigures]) -> Verdict:
    """The reading of a comparison, paired by seed: both sides of a seed share its data
    order and initial random state, so the seed's own luck (often larger than any variant's
    effect) cancels in its difference. The spread is the range of the seeds' differences; a
    difference counts when every seed's has the same sign and their mean exceeds the spread."""
    a = statistics.fmean(r.val_loss for r in variant)
    b = statistics.fmean(r.val_loss for r in baseline)
    by_seed = {r.seed: r.val_loss for r in baseline}
    diffs = [r.val_loss - by_seed[r.seed] for r in variant if r.seed in by_seed]
    diff = a - b
    spread = max(diffs) - min(diffs) if len(diffs) > 1 else None
    if spread is None:
        reading = "one seed: no seed-to-seed spread to compare the difference with"
    elif abs(diff) <= spread or min(diffs) < 0 < max(diffs):
        reading = f"within the seed-to-seed spread ({spread:.4f}): no difference shown"
    else:
        better = c.variant if diff < 0 else c.baseline
        reading = (
            f"{better} is better by {abs(diff):.4f} with every seed, more than the "
            f"seed-to-seed spread ({spread:.4f})"
        )
    return Verdict(
        c.key, c.title, c.variant, c.baseline, a, b, diff, spread, reading, [*variant, *baseline]
    )


# ---- the suite -------------------------------------------------------------------------------


@dataclass
class Evidence:
    """The suite's outcome: the budget, every comparison's verdict, and the top-k table
    (per k: mean validation loss and decode tokens/s over the seeds' base MoEs)."""

    budget: str
    seeds: list[int]
    steps: int
    verdicts: list[Verdict]
    topk: list[dict[str, float]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdicts": [v.to_dict() for v in self.verdicts]}


def comparisons() -> tuple[Comparison, ...]:
    """The comparisons this installation can run (hierarchical where the router exists)."""
    from moekit.config import ROUTERS

    extra: tuple[Comparison, ...] = ()
    if "hierarchical" in ROUTERS and "hierarchical" in VARIANTS:
        extra = (Comparison("hierarchical", "Hierarchical vs flat top-k routing", "hierarchical"),)
    return (*COMPARISONS, *extra)


def run_evidence(
    b: Budget,
    out_dir: str | Path,
    *,
    only: tuple[str, ...] | None = None,
    say: Callable[[str], None] = print,
    jobs: int = 1,
) -> Evidence:
    """Run the suite (or the comparisons named in `only`) under `out_dir`/runs, one run per
    variant and seed (shared between comparisons; a finished run is reused, an interrupted
    one continues). With `jobs` > 1, that many runs train at once in their own processes,
    sharing this process's threads (`train_all`)."""
    import time

    from moekit.bench.topk import bench_topk

    chosen = [c for c in comparisons() if only is None or c.key in only]
    unknown = sorted(set(only or ()) - {c.key for c in comparisons()} - {"topk_inference"})
    if unknown:
        names = ", ".join([c.key for c in comparisons()] + ["topk_inference"])
        raise ValueError(f"comparison {unknown[0]!r} is unknown: choose from {names}")
    t0 = time.perf_counter()
    needed = [v for c in chosen for v in (c.variant, c.baseline)]
    if only is None or "topk_inference" in only:
        needed.append("moe")
    tasks = [(v, s) for v in dict.fromkeys(needed) for s in b.seeds]
    runs = train_all(b, tasks, Path(out_dir) / "runs", jobs=jobs, say=say)
    verdicts = [
        verdict(c, [runs[c.variant, s] for s in b.seeds], [runs[c.baseline, s] for s in b.seeds])
        for c in chosen
    ]
    topk: list[dict[str, float]] = []
    if only is None or "topk_inference" in only:
        say("measuring experts per token at inference ...")
        tables = [bench_topk(Path(out_dir) / "runs" / f"moe-s{s}", val_batches=2, prompts=2,
                             new_tokens=8, repeats=3).rows for s in b.seeds]  # fmt: skip
        for rows in zip(*tables, strict=True):
            speed = statistics.fmean(r.decode_tokens_per_s for r in rows)
            loss = statistics.fmean(r.val_loss for r in rows)
            topk.append({"k": rows[0].k, "val_loss": loss, "decode_tokens_per_s": speed})
    return Evidence(
        b.name, list(b.seeds), b.train["max_steps"], verdicts, topk, time.perf_counter() - t0
    )
