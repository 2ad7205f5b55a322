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
import json
import sys
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.files import atomic_write_text
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.config import RunConfig, TrainConfig

CURVE_FIELDS = {"step": "step", "tokens": "tokens", "seconds": "elapsed_s", "val_loss": "val_loss"}


def dense_for_upcycling(moe_cfg: ModelConfig, granularity: int) -> ModelConfig:
    """The dense model whose upcycling gives `moe_cfg`'s experts: same attention, embeddings
    and depth; MLP width = expert width x granularity."""
    if moe_cfg.moe is None:
        raise ValueError("bench upcycle needs an MoE model config (model.moe is not set)")
    dense = copy.deepcopy(moe_cfg)
    dense.moe = None
    dense.ffn_hidden = moe_cfg.moe.expert_hidden * granularity
    return ModelConfig.from_dict(dense.to_dict())


def _train_section(cfg: RunConfig, steps: int, init_from: Path | None) -> TrainConfig:
    data = cfg.train.to_dict()
    data.update(max_steps=steps, init_from=str(init_from) if init_from else None)
    data["eval_every"] = min(data["eval_every"], steps)
    data["save_every"] = min(data["save_every"], steps)
    return TrainConfig.from_dict(data)


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
) -> dict[str, Any]:
    """Run the comparison described in the module docstring under `out_dir` (dense/,
    upcycled/, scratch/, dense_continued/); write upcycle.json and upcycle.png and return the
    figures: per run its parameters, steps, tokens, seconds, final validation loss and
    evaluation curve, and `upcycled_minus_scratch` (negative: upcycling is ahead)."""
    from moekit.finetune.upcycle import upcycle
    from moekit.report import plots
    from moekit.training.trainer import train

    if dense_steps < 1 or steps < 1:
        raise ValueError(f"dense_steps={dense_steps} and steps={steps} must be >= 1")
    moe = cfg.model.moe
    if moe is None:
        raise ValueError("bench upcycle needs an MoE model config (model.moe is not set)")
    out = Path(out_dir)
    dense_cfg = dense_for_upcycling(cfg.model, granularity)

    def run(name: str, model: ModelConfig, n: int, init_from: Path | None = None) -> Path:
        pc = count_params(model)
        if verbose:
            source = f", starting from {init_from}" if init_from else ""
            print(
                f"== {name}: {pc.total:,} parameters, {pc.active:,} active per token, "
                f"{n} steps{source}",
                file=sys.stderr,
            )
        run_cfg = RunConfig(model=model, data=cfg.data, train=_train_section(cfg, n, init_from))
        resume = latest_checkpoint(out / name) is not None
        train(run_cfg, out / name, verbose=verbose, resume=resume)
        return out / name

    settings = {"run": cfg.to_dict(), "dense_steps": dense_steps, "steps": steps,
                "granularity": granularity, "noise": noise}  # fmt: skip
    marker = out / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) != settings:
        raise ValueError(
            f"{out} holds a benchmark run with other settings ({marker}); choose another --out "
            "or delete it"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(settings, indent=2) + "\n")
    dense_dir = run("dense", dense_cfg, dense_steps)
    init = out / "upcycled_init"
    if not ModelDir(init).is_model():
        upcycle(
            dense_dir,
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
    moe_cfg = ModelConfig.load(init)
    runs = {
        "upcycled": run("upcycled", moe_cfg, steps, init),
        "scratch": run("scratch", moe_cfg, steps),
    }
    if dense_continue:
        runs["dense_continued"] = run("dense_continued", dense_cfg, steps, dense_dir)
    results: dict[str, Any] = {"dense": _figures(dense_dir, dense_cfg)}
    for name, directory in runs.items():
        results[name] = _figures(directory, moe_cfg if name != "dense_continued" else dense_cfg)
    summary = {
        "dense_steps": dense_steps,
        "steps": steps,
        "num_experts": moe_cfg.moe.num_experts,  # type: ignore[union-attr]
        "top_k": moe_cfg.moe.top_k,  # type: ignore[union-attr]
        "granularity": granularity,
        "noise": noise,
        "upcycled_val_loss": results["upcycled"]["val_loss"],
        "scratch_val_loss": results["scratch"]["val_loss"],
        "upcycled_minus_scratch": results["upcycled"]["val_loss"] - results["scratch"]["val_loss"],
        "runs": results,
    }
    if dense_continue:
        summary["dense_continued_val_loss"] = results["dense_continued"]["val_loss"]
    atomic_write_text(out / "upcycle.json", json.dumps(summary, indent=2) + "\n")
    plots.validation_curves({k: v for k, v in results.items() if k != "dense"}, out / "upcycle.png")
    return summary


def _figures(directory: Path, model: ModelConfig) -> dict[str, Any]:
    evals = [r for r in ModelDir(directory).read_metrics() if r["kind"] == "eval"]
    if not evals:
        raise ValueError(f"{directory} has no evaluation in its metrics")
    pc = count_params(model)
    return {
        "total_params": pc.total,
        "active_params": pc.active,
        "steps": evals[-1]["step"],
        "tokens": evals[-1]["tokens"],
        "train_seconds": evals[-1]["elapsed_s"],
        "val_loss": evals[-1]["val_loss"],
        "curve": [{k: r[src] for k, src in CURVE_FIELDS.items()} for r in evals],
    }
