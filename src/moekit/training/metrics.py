"""Run metrics: routing health per MoE layer, and the metrics.jsonl (+ TensorBoard) log.

Routing health follows the one rule of `moekit.analysis.routing.load_stats`, so the `dead`
count a training record logs is the count `moekit doctor` and `moekit analyze` would report
for the same copies per expert.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.routing import load_stats
from moekit.files import atomic_write_text, json_safe
from moekit.model_dir import ModelDir


def routing_metrics(counts: Tensor, dropped: int, entropy: float) -> dict[str, float]:
    """Load statistics of one MoE layer from its routed copies per expert.

    imbalance: max over mean copies per expert (1.0 is perfect balance; NaN without copies);
    cv: coefficient of variation of the copies per expert; dead: how many experts received
    no copy; dropped: copies dropped by the capacity rule; entropy: mean routing entropy (nats).
    """
    stats = load_stats(counts.detach().cpu())
    return {
        "imbalance": stats.imbalance,
        "cv": stats.cv,
        "dead": len(stats.dead),
        "dropped": int(dropped),
        "entropy": float(entropy),
    }


class RoutingAccumulator:
    """Sums routed counts, drops and entropy per MoE layer between two log lines."""

    def __init__(self) -> None:
        self.counts: dict[int, Tensor] = {}
        self.dropped: dict[int, int] = {}
        self.entropy: dict[int, list[float]] = {}

    def add(self, layer: int, counts: Tensor, dropped: Tensor, entropy: Tensor) -> None:
        """Add one micro-batch's statistics of MoE layer `layer`."""
        c = counts.detach().to("cpu", torch.long)
        self.counts[layer] = self.counts[layer] + c if layer in self.counts else c
        self.dropped[layer] = self.dropped.get(layer, 0) + int(dropped)
        self.entropy.setdefault(layer, []).append(float(entropy))

    def summary(self) -> dict[str, dict[str, float]]:
        """`routing_metrics` of each layer over what was added since the last reset."""
        return {
            str(layer): routing_metrics(
                counts,
                self.dropped[layer],
                sum(self.entropy[layer]) / len(self.entropy[layer]),
            )
            for layer, counts in sorted(self.counts.items())
        }

    def reset(self) -> None:
        """Forget what was added (the start of the next log window)."""
        self.__init__()  # type: ignore[misc]


class MetricsLog:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl, and mirrors numbers to
    TensorBoard event files (RUN_DIR/tensorboard/) when tensorboard is installed.

    On resume from step s, records after s (written after that checkpoint) are dropped first,
    so the log reads as one uninterrupted run; so is a half-written last line left by a crash.
    Non-finite numbers are written as null (JSON has no NaN).
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.path = run_dir / ModelDir.METRICS
        if resume_step is not None and self.path.exists():
            kept = [
                json.dumps(r)
                for r in ModelDir(run_dir).read_metrics()
                if r.get("step", 0) <= resume_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from.
            self._tb = SummaryWriter(str(run_dir / ModelDir.TENSORBOARD), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in _flatten(record):
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    kind = record.get("kind", "")
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{name}/"))
        elif key != "kind":
            out.append((f"{kind}/{name}" if kind and not prefix else name, value))
    return out
