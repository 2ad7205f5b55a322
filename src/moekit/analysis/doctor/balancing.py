"""The checks on what balances the load: the aux-loss-free selection bias, and whether
anything balances at all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.analysis.doctor.check import Check, ids, moe_layers, not_applicable
from moekit.analysis.doctor.weight_files import WeightFiles
from moekit.model_dir import ModelDir

if TYPE_CHECKING:
    from moekit.config import ModelConfig


def _bias_name(layer: int) -> str:
    return f"layers.{layer}.ffn.router.selection_bias"


def _frozen_routing_method(run: Path | None) -> str | None:
    """The fine-tuning method of the run in `run` when it keeps the routers frozen (LoRA,
    ESFT), else None."""
    if run is None:
        return None
    try:
        summary = ModelDir(run).finetune_summary()
        method = summary.method if summary is not None else None
    except (OSError, ValueError):
        return None
    return method if method in ("lora", "esft") else None


def check_selection_bias(cfg: ModelConfig, weights: WeightFiles, run: Path | None) -> Check:
    """selection_bias: with aux-loss-free balancing (bias_update_rate > 0), a selection bias
    that is missing, all zeros, or unchanged between the run's two newest checkpoints is a
    problem."""
    name = "selection_bias"
    if cfg.moe is None:
        return not_applicable(name, "the model is dense (no MoE layer)")
    rate = cfg.moe.bias_update_rate
    if rate <= 0:
        why = "model.moe.bias_update_rate is 0 (no aux-loss-free balancing)"
        if cfg.moe.selection_bias:
            why += "; the model holds a fixed selection bias that training does not update"
        return not_applicable(name, why)
    layers = moe_layers(cfg)
    if missing := [i for i in layers if _bias_name(i) not in weights]:
        return Check(
            name,
            "problem",
            f"bias_update_rate={rate:g} but no selection bias is stored for layer(s) "
            f"{ids(missing)}.",
            "The config asks for aux-loss-free balancing but the weights hold no selection "
            "bias: the weights were written by something that dropped the router buffers. "
            "Re-export them with the buffers (model.state_dict() includes them).",
            {"missing_layers": missing},
        )
    biases = {i: weights.get(_bias_name(i)).float() for i in layers}
    zero = [i for i, b in biases.items() if not bool(b.any())]
    data: dict[str, Any] = {
        "bias_update_rate": rate,
        "max_abs_bias": {str(i): float(b.abs().max()) for i, b in biases.items()},
        "zero_layers": zero,
    }
    problems = []
    if zero:
        problems.append(
            f"the selection bias of layer(s) {ids(zero)} is all zeros in the model "
            f"(bias_update_rate={rate:g}: training moves it by {rate:g} per step)"
        )
    compared = _compare_checkpoints(layers, run, data, problems)
    if problems:
        advice = (
            "Aux-loss-free balancing only works if the trainer updates the bias after each "
            "optimizer step (Transformer.update_router_biases with the step's routed counts). A "
            "bias that never moves means a custom training loop skips that call, or the bias "
            "is not saved with the weights; nothing then balances the load unless the aux loss "
            "does."
        )
        return Check(name, "problem", "; ".join(problems) + ".", advice, data)
    largest = max(float(b.abs().max()) for b in biases.values())
    evidence = (
        f"bias_update_rate={rate:g}: the selection bias of every MoE layer is non-zero (largest "
        f"|bias| {largest:.3g}){compared}."
    )
    return Check(name, "ok", evidence, "", data)


def _compare_checkpoints(
    layers: list[int], run: Path | None, data: dict[str, Any], problems: list[str]
) -> str:
    """Compare the selection biases of the run's two newest checkpoints: records the change
    per layer in `data`, adds a problem for a bias that did not move, and returns the clause
    the evidence ends with."""
    import torch

    frozen_by = _frozen_routing_method(run)
    if frozen_by is not None:
        # LoRA and ESFT fine-tuning freeze the routers, their balancing biases included.
        data["frozen_by_finetune"] = frozen_by
        return (
            f"; a {frozen_by} fine-tune keeps the routers and their biases frozen by design, "
            "so checkpoints were not compared"
        )
    if run is None:
        return "; no run directory, so no change between checkpoints was compared"
    checkpoints = ModelDir(run).checkpoints()[-2:]
    if len(checkpoints) < 2:
        return "; fewer than two checkpoints in train_state/, so no change was compared"
    older, newer = (WeightFiles(p) for p in checkpoints)
    unchanged, change = [], {}
    for i in layers:
        if _bias_name(i) not in older or _bias_name(i) not in newer:
            continue
        a, b = older.get(_bias_name(i)).float(), newer.get(_bias_name(i)).float()
        change[str(i)] = float((a - b).abs().max())
        if torch.equal(a, b):
            unchanged.append(i)
    data["checkpoints"] = [p.name for p in checkpoints]
    data["max_change"] = change
    if unchanged:
        problems.append(
            f"it is identical in checkpoints {checkpoints[0].name} and {checkpoints[1].name} "
            f"for layer(s) {ids(unchanged)}"
        )
    if not change:
        return ""
    return (
        f"; it moved by up to {max(change.values()):.3g} between {checkpoints[0].name} "
        f"and {checkpoints[1].name}"
    )


def check_load_balancing(cfg: ModelConfig) -> Check:
    """load_balancing: a token-choice router with neither an aux loss nor aux-loss-free
    balancing is a problem (nothing keeps its load balanced)."""
    name = "load_balancing"
    moe = cfg.moe
    if moe is None:
        return not_applicable(name, "the model is dense (no MoE layer)")
    data = {
        "router": moe.router,
        "score_func": moe.score_func,
        "aux_loss_weight": moe.aux_loss_weight,
        "bias_update_rate": moe.bias_update_rate,
    }
    if moe.router == "expert_choice":
        return Check(
            name, "ok", "expert-choice routing balances the load by construction.", data=data
        )
    balancers = []
    if moe.aux_loss_weight > 0:
        balancers.append(f"a load-balancing loss (aux_loss_weight={moe.aux_loss_weight:g})")
    if moe.bias_update_rate > 0:
        balancers.append(f"aux-loss-free balancing (bias_update_rate={moe.bias_update_rate:g})")
    if balancers:
        return Check(
            name, "ok", "the load is balanced by " + " and ".join(balancers) + ".", data=data
        )
    evidence = (
        f"model.moe.aux_loss_weight is 0 with a {moe.score_func} {moe.router} router and no "
        "aux-loss-free balancing (bias_update_rate is 0): nothing in training keeps the load "
        "balanced, and token-choice routers then tend to send most tokens to a few experts."
    )
    advice = (
        "Set model.moe.aux_loss_weight (0.01 is the usual value; 0.001 for many experts) or "
        "model.moe.bias_update_rate (e.g. 0.001, DeepSeek-V3's aux-loss-free balancing) before "
        "training or fine-tuning this model."
    )
    return Check(name, "problem", evidence, advice, data)
