"""`moekit compare`: the same data, tokens and seed through an MoE and dense baselines.

The dense baseline with equal *active* parameters asks whether the MoE's extra (inactive)
parameters buy quality at the same compute per token; the optional dense baseline with equal
*total* parameters shows what the same memory would give as a dense model.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.files import atomic_write_text
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.report import plots
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.config import RunConfig


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


def compare(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    dense_total: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train `cfg`'s MoE and a dense model with the same active parameters (and, with
    `dense_total`, one with the same total parameters) on the same data, tokens and seed.

    Each run is a full model directory under `out_dir` (moe/, dense_active/, dense_total/);
    running the same comparison again continues runs that were interrupted. Writes
    compare.png (validation loss against tokens and against training time) and compare.json,
    and returns the same figures: `moe_val_loss`, `dense_val_loss`, and per run its
    parameters, tokens, seconds and final validation loss per domain.
    """
    from moekit.training.trainer import train

    if cfg.model.moe is None:
        raise ValueError("compare needs an MoE model config (model.moe is not set)")
    out = Path(out_dir)
    moe_counts = count_params(cfg.model)
    runs: dict[str, ModelConfig] = {
        "moe": cfg.model,
        "dense_active": dense_with_params(cfg.model, moe_counts.active),
    }
    if dense_total:
        runs["dense_total"] = dense_with_params(cfg.model, moe_counts.total)
    results: dict[str, Any] = {}
    for name, model_cfg in runs.items():
        run_cfg = RunConfig(model=model_cfg, data=cfg.data, train=cfg.train)
        if verbose:
            pc = count_params(model_cfg)
            print(
                f"== {name}: {pc.total:,} parameters, {pc.active:,} active per token",
                file=sys.stderr,
            )
        # Running the same comparison again continues an interrupted run where it stopped.
        checkpoint = latest_checkpoint(out / name)
        result = train(run_cfg, out / name, verbose=verbose, resume=checkpoint is not None)
        pc = count_params(model_cfg)
        results[name] = {
            "total_params": pc.total,
            "active_params": pc.active,
            "ffn_hidden": model_cfg.ffn_hidden if model_cfg.moe is None else None,
            "tokens": result.tokens,
            "train_seconds": result.seconds,
            "val_loss": result.val_loss,
            "val_by_domain": result.val_by_domain,
            "curve": [
                {"tokens": r["tokens"], "seconds": r["elapsed_s"], "val_loss": r["val_loss"]}
                for r in ModelDir(out / name).read_metrics()
                if r["kind"] == "eval"
            ],
        }
    summary: dict[str, Any] = {
        "moe_val_loss": results["moe"]["val_loss"],
        "dense_val_loss": results["dense_active"]["val_loss"],
        "runs": results,
    }
    if dense_total:
        summary["dense_total_val_loss"] = results["dense_total"]["val_loss"]
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2) + "\n")
    plots.validation_curves(results, out / "compare.png")
    return summary
