"""The check on a training run's metrics: experts the run itself reports dead.

The `dead` count of each training record is `moekit.training.metrics.routing_metrics`, which
follows the same rule as the routing sample's checks (`moekit.analysis.routing.load_stats`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moekit.analysis.doctor.check import Check, not_applicable
from moekit.model_dir import ModelDir

if TYPE_CHECKING:
    from moekit.config import ModelConfig


def check_training_dead(cfg: ModelConfig, run: Path | None, window: int) -> Check:
    """training_dead_experts: dead experts in each of the last `window` training records of
    the run's metrics.jsonl are a problem; in the last one only, a warning."""
    name = "training_dead_experts"
    if cfg.moe is None:
        return not_applicable(name, "the model is dense (no MoE layer)")
    if run is None:
        return not_applicable(name, "no run directory (pass --run RUN_DIR)")
    records = [
        r
        for r in ModelDir(run).read_metrics()
        if r.get("kind") == "train" and isinstance(r.get("routing"), dict)
    ]
    if not records:
        return not_applicable(name, f"{run}/metrics.jsonl has no training routing records")
    recent = records[-window:]
    last = recent[-1]
    dead_last = {k: int(v.get("dead") or 0) for k, v in last["routing"].items()}
    persistent = [
        k
        for k, n in dead_last.items()
        if n > 0
        and len(recent) == window
        and all(int((r["routing"].get(k) or {}).get("dead") or 0) > 0 for r in recent)
    ]
    imbalance = {k: v.get("imbalance") for k, v in last["routing"].items()}
    data = {
        "run_dir": str(run),
        "step": last.get("step"),
        "dead": dead_last,
        "imbalance": imbalance,
        "window": window,
        "persistent_layers": persistent,
    }
    steps = f"steps {recent[0].get('step')}..{last.get('step')}"
    advice = (
        "The run is training experts that receive no tokens. Raise model.moe.aux_loss_weight "
        "or turn on aux-loss-free balancing (model.moe.bias_update_rate), then resume; check "
        "the load plots in report/ to see when the experts died."
    )
    dead_words = ", ".join(f"layer {k}: {n}" for k, n in dead_last.items() if n)
    if persistent:
        evidence = (
            f"metrics.jsonl reports dead experts in every one of the last {window} training "
            f"records ({steps}); at step {last.get('step')}: {dead_words}."
        )
        return Check(name, "problem", evidence, advice, data)
    if dead_words:
        evidence = (
            f"metrics.jsonl reports dead experts at step {last.get('step')} ({dead_words}), "
            f"though not in each of the last {window} records ({steps})."
        )
        return Check(name, "warning", evidence, advice, data)
    finite = [float(v) for v in imbalance.values() if isinstance(v, int | float)]
    spread = f"; imbalance {min(finite):.2f} to {max(finite):.2f}" if finite else ""
    evidence = (
        f"metrics.jsonl at step {last.get('step')}: no dead expert in the "
        f"{len(dead_last)} MoE layer(s){spread}."
    )
    return Check(name, "ok", evidence, "", data)
