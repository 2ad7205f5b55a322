"""`moekit compare`: the same data, tokens and seed through an MoE and dense baselines.

The dense baseline with equal *active* parameters asks whether the MoE's extra (inactive)
parameters buy quality at the same compute per token; the optional dense baseline with equal
*total* parameters shows what the same memory would give as a dense model.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.files import write_json
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.report import plots
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.config import RunConfig

# What `compare` writes into its output folder.
COMPARE_JSON = "compare.json"
COMPARE_PLOT = "compare.png"


def dense_with_params(moe_cfg: ModelConfig, target: int) -> ModelConfig:
    """A dense twin of `moe_cfg` (same attention, embeddings and depth) whose FFN width makes
    its parameter count as close to `target` as a whole number of hidden units allows."""
    dense = copy.deepcopy(moe_cfg)
    dense.moe = None
    dense.ffn_hidden = 1
    base = count_params(dense).total
    per_unit = count_params(_with_hidden(dense, 2)).total - base
    dense.ffn_hidden = max(1, round((target - base) / per_unit) + 1)
    return ModelConfig.from_dict(dense.to_dict())


def _with_hidden(cfg: ModelConfig, hidden: int) -> ModelConfig:
    out = copy.deepcopy(cfg)
    out.ffn_hidden = hidden
    return out


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of a run: validation loss after `tokens` tokens and `seconds` of
    training."""

    tokens: int
    seconds: float
    val_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds, "val_loss": self.val_loss}


@dataclass(frozen=True)
class CompareRun:
    """One model of a comparison: its size, what it trained on, how it ended, its curve."""

    total_params: int
    active_params: int
    ffn_hidden: int | None  # the dense models' FFN width; None for the MoE
    tokens: int
    train_seconds: float
    val_loss: float | None
    val_by_domain: dict[str, float]
    curve: list[CurvePoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "ffn_hidden": self.ffn_hidden,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "val_loss": self.val_loss,
            "val_by_domain": self.val_by_domain,
            "curve": [p.to_dict() for p in self.curve],
        }


@dataclass(frozen=True)
class CompareResult:
    """The runs of a comparison by name: "moe", "dense_active" and, when asked for,
    "dense_total". `to_dict()` is compare.json."""

    runs: dict[str, CompareRun]

    @property
    def moe_val_loss(self) -> float | None:
        return self.runs["moe"].val_loss

    @property
    def dense_val_loss(self) -> float | None:
        """The dense model with the MoE's active parameters."""
        return self.runs["dense_active"].val_loss

    @property
    def dense_total_val_loss(self) -> float | None:
        """The dense model with the MoE's total parameters (None when not trained)."""
        run = self.runs.get("dense_total")
        return run.val_loss if run is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "moe_val_loss": self.moe_val_loss,
            "dense_val_loss": self.dense_val_loss,
            "runs": {name: run.to_dict() for name, run in self.runs.items()},
        }
        if "dense_total" in self.runs:
            out["dense_total_val_loss"] = self.dense_total_val_loss
        return out


def compare(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    dense_total: bool = False,
    verbose: bool = True,
) -> CompareResult:
    """Train `cfg`'s MoE and a dense model with the same active parameters (and, with
    `dense_total`, one with the same total parameters) on the same data, tokens and seed.

    Each run is a full model directory under `out_dir` (moe/, dense_active/, dense_total/);
    running the same comparison again continues runs that were interrupted. Writes
    compare.png (validation loss against tokens and against training time) and compare.json
    (the result's `to_dict()`), and returns the result: per run its parameters, tokens,
    seconds, final validation loss (overall and per domain) and validation curve.
    """
    from moekit.training.trainer import train

    if cfg.model.moe is None:
        raise ValueError("compare needs an MoE model config (model.moe is not set)")
    out = Path(out_dir)
    moe_counts = count_params(cfg.model)
    models: dict[str, ModelConfig] = {
        "moe": cfg.model,
        "dense_active": dense_with_params(cfg.model, moe_counts.active),
    }
    if dense_total:
        models["dense_total"] = dense_with_params(cfg.model, moe_counts.total)
    runs: dict[str, CompareRun] = {}
    for name, model_cfg in models.items():
        pc = count_params(model_cfg)
        if verbose:
            print(
                f"== {name}: {pc.total:,} parameters, {pc.active:,} active per token",
                file=sys.stderr,
            )
        # Running the same comparison again continues an interrupted run where it stopped.
        run_dir = out / name
        result = train(
            RunConfig(model=model_cfg, data=cfg.data, train=cfg.train),
            run_dir,
            verbose=verbose,
            resume=latest_checkpoint(run_dir) is not None,
        )
        runs[name] = CompareRun(
            total_params=pc.total,
            active_params=pc.active,
            ffn_hidden=model_cfg.ffn_hidden if model_cfg.moe is None else None,
            tokens=result.tokens,
            train_seconds=result.seconds,
            val_loss=result.val_loss,
            val_by_domain=result.val_by_domain,
            curve=[
                CurvePoint(r["tokens"], r["elapsed_s"], r["val_loss"])
                for r in ModelDir(run_dir).read_metrics()
                if r["kind"] == "eval"
            ],
        )
    summary = CompareResult(runs)
    write_json(out / COMPARE_JSON, summary.to_dict())
    plots.validation_curves({n: r.to_dict() for n, r in runs.items()}, out / COMPARE_PLOT)
    return summary
