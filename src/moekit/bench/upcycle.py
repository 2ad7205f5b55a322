"""`moekit bench upcycle`: does starting an MoE from a trained dense model pay off?

1. train a dense model (`dense_steps` steps) whose MLP is as wide as `granularity` experts of
   the configured MoE;
2. upcycle it into that MoE (moekit.finetune.upcycle) and continue training for `steps`;
3. train the same MoE (same config, data, seed and train settings) from scratch for `steps`;
4. optionally (`dense_continue`) train the dense model `steps` more, the baseline that spends
   the same extra steps without upcycling.

The MoE is the upcycled one: softmax top-k routing with the configured number of experts,
top-k, expert width (x granularity) and layer placement, aux and z-loss weights; other router
settings of the config (sigmoid scores, bias balancing, shared experts) do not carry over, and
the scratch run trains exactly the upcycled config. All runs share the data, its split and the
tokenizer, and are evaluated on the same validation rows. The upcycled model's curve
starts where the dense model left off; the question is whether, after the same number of MoE
steps, it is ahead of the MoE trained from scratch. Running the benchmark again continues
interrupted runs.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.files import read_json, write_json
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.config import RunConfig, TrainConfig


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of a run: its step, training tokens and seconds so far, and the
    validation loss."""

    step: int
    tokens: int
    seconds: float
    val_loss: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "val_loss": self.val_loss,
        }


@dataclass(frozen=True)
class UpcycleRun:
    """One training run of the comparison: its model's parameters and, at its last
    evaluation, steps, tokens, training seconds and validation loss; `curve` holds every
    evaluation."""

    total_params: int
    active_params: int
    steps: int
    tokens: int
    train_seconds: float
    val_loss: float
    curve: list[CurvePoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "val_loss": self.val_loss,
            "curve": [p.to_dict() for p in self.curve],
        }


@dataclass(frozen=True)
class UpcycleBench:
    """What `bench_upcycle` found: its settings, the MoE's experts and top-k, and each run
    (`runs`: dense, upcycled, scratch and, unless skipped, dense_continued, in that order)."""

    dense_steps: int
    steps: int
    num_experts: int
    top_k: int
    granularity: int
    noise: float
    runs: dict[str, UpcycleRun]

    @property
    def upcycled_val_loss(self) -> float:
        return self.runs["upcycled"].val_loss

    @property
    def scratch_val_loss(self) -> float:
        return self.runs["scratch"].val_loss

    @property
    def dense_continued_val_loss(self) -> float | None:
        run = self.runs.get("dense_continued")
        return None if run is None else run.val_loss

    @property
    def upcycled_minus_scratch(self) -> float:
        """Negative: upcycling is ahead."""
        return self.upcycled_val_loss - self.scratch_val_loss

    def to_dict(self) -> dict[str, Any]:
        """The figures as written to upcycle.json (dense_continued_val_loss only where that
        run was trained)."""
        out: dict[str, Any] = {
            "dense_steps": self.dense_steps,
            "steps": self.steps,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "granularity": self.granularity,
            "noise": self.noise,
            "upcycled_val_loss": self.upcycled_val_loss,
            "scratch_val_loss": self.scratch_val_loss,
            "upcycled_minus_scratch": self.upcycled_minus_scratch,
            "runs": {name: run.to_dict() for name, run in self.runs.items()},
        }
        if (continued := self.dense_continued_val_loss) is not None:
            out["dense_continued_val_loss"] = continued
        return out


def dense_for_upcycling(moe_cfg: ModelConfig, granularity: int) -> ModelConfig:
    """The dense model whose upcycling gives `moe_cfg`'s experts: same attention, embeddings
    and depth; MLP width = expert width x granularity."""
    if moe_cfg.moe is None:
        raise ValueError("bench upcycle needs an MoE model config (model.moe is not set)")
    dense = copy.deepcopy(moe_cfg)
    dense.moe = None
    dense.ffn_hidden = moe_cfg.moe.expert_hidden * granularity
    return ModelConfig.from_dict(dense.to_dict())


def bench_upcycle(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    dense_steps: int,
    steps: int,
    granularity: int = 1,
    noise: float = 0.0,
    dense_continue: bool = True,
    verbose: bool = True,
) -> UpcycleBench:
    """Run the comparison described in the module docstring under `out_dir` (dense/,
    upcycled/, scratch/, dense_continued/); write upcycle.json and upcycle.png and return the
    figures: per run its parameters, steps, tokens, seconds, final validation loss and
    evaluation curve, and `upcycled_minus_scratch` (negative: upcycling is ahead)."""
    from moekit.report import plots

    if dense_steps < 1 or steps < 1:
        raise ValueError(f"dense_steps={dense_steps} and steps={steps} must be >= 1")
    moe = cfg.model.moe
    if moe is None:
        raise ValueError("bench upcycle needs an MoE model config (model.moe is not set)")
    out = Path(out_dir)
    dense_cfg = dense_for_upcycling(cfg.model, granularity)
    settings = {"run": cfg.to_dict(), "dense_steps": dense_steps, "steps": steps,
                "granularity": granularity, "noise": noise}  # fmt: skip
    _claim(out, settings)

    def run(name: str, model: ModelConfig, n: int, init_from: Path | None = None) -> UpcycleRun:
        _train(cfg, out / name, model, n, init_from, verbose)
        return _figures(out / name, model)

    runs = {"dense": run("dense", dense_cfg, dense_steps)}
    init = _upcycled_init(cfg, out, moe, granularity, noise)
    moe_cfg = ModelDir(init).config()
    runs["upcycled"] = run("upcycled", moe_cfg, steps, init)
    runs["scratch"] = run("scratch", moe_cfg, steps)
    if dense_continue:
        runs["dense_continued"] = run("dense_continued", dense_cfg, steps, out / "dense")
    assert moe_cfg.moe is not None  # upcycling makes an MoE
    result = UpcycleBench(
        dense_steps=dense_steps,
        steps=steps,
        num_experts=moe_cfg.moe.num_experts,
        top_k=moe_cfg.moe.top_k,
        granularity=granularity,
        noise=noise,
        runs=runs,
    )
    write_json(out / "upcycle.json", result.to_dict())
    curves = {name: r.to_dict() for name, r in runs.items() if name != "dense"}
    plots.validation_curves(curves, out / "upcycle.png")
    return result


def _claim(out: Path, settings: dict[str, Any]) -> None:
    """Mark `out` as holding a benchmark run with `settings`, refusing one that holds a run
    with other settings (running again with the same settings continues it)."""
    marker = out / "bench.json"
    if marker.is_file() and read_json(marker, what="benchmark settings") != settings:
        raise ValueError(
            f"{out} holds a benchmark run with other settings ({marker}); choose another "
            "output directory or delete it"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, settings)


def _train(
    cfg: RunConfig,
    run_dir: Path,
    model: ModelConfig,
    steps: int,
    init_from: Path | None,
    verbose: bool,
) -> None:
    """Train `model` for `steps` with `cfg`'s data and train settings (from `init_from`'s
    weights if given), continuing an interrupted run in `run_dir`."""
    from moekit.training.trainer import train

    if verbose:
        pc = count_params(model)
        source = f", starting from {init_from}" if init_from else ""
        print(
            f"== {run_dir.name}: {pc.total:,} parameters, {pc.active:,} active per token, "
            f"{steps} steps{source}",
            file=sys.stderr,
        )
    run_cfg = RunConfig(model=model, data=cfg.data, train=_train_section(cfg, steps, init_from))
    resume = latest_checkpoint(run_dir) is not None
    train(run_cfg, run_dir, verbose=verbose, resume=resume)


def _train_section(cfg: RunConfig, steps: int, init_from: Path | None) -> TrainConfig:
    data = cfg.train.to_dict()
    data.update(max_steps=steps, init_from=str(init_from) if init_from else None)
    data["eval_every"] = min(data["eval_every"], steps)
    data["save_every"] = min(data["save_every"], steps)
    return TrainConfig.from_dict(data)


def _upcycled_init(
    cfg: RunConfig, out: Path, moe: MoEConfig, granularity: int, noise: float
) -> Path:
    """The upcycled MoE of the trained dense model out/dense, in out/upcycled_init (made once:
    a run that continues finds it there)."""
    from moekit.finetune.upcycle import upcycle

    init = out / "upcycled_init"
    if not ModelDir(init).is_model():
        upcycle(
            out / "dense",
            init,
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            granularity=granularity,
            noise=noise,
            seed=cfg.train.seed,
            aux_loss_weight=moe.aux_loss_weight,
            z_loss_weight=moe.z_loss_weight,
            first_dense_layers=moe.first_dense_layers,
            layer_step=moe.layer_step,
        )
    return init


def _figures(directory: Path, model: ModelConfig) -> UpcycleRun:
    evals = [r for r in ModelDir(directory).read_metrics() if r["kind"] == "eval"]
    if not evals:
        raise ValueError(f"{directory} has no evaluation in its metrics")
    pc = count_params(model)
    return UpcycleRun(
        total_params=pc.total,
        active_params=pc.active,
        steps=evals[-1]["step"],
        tokens=evals[-1]["tokens"],
        train_seconds=evals[-1]["elapsed_s"],
        val_loss=evals[-1]["val_loss"],
        curve=[
            CurvePoint(r["step"], r["tokens"], seconds=r["elapsed_s"], val_loss=r["val_loss"])
            for r in evals
        ],
    )
