"""`diagnose`: run every doctor check on a model directory (and its training run) and return
the `Diagnosis`. The checks run in the order of `diagnose`'s list, the order they are
reported in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from moekit.analysis.doctor.adapters import check_adapters
from moekit.analysis.doctor.balancing import check_load_balancing, check_selection_bias
from moekit.analysis.doctor.check import STATUSES, Check, Status, exit_code, worst_status
from moekit.analysis.doctor.groups import check_dead_groups
from moekit.analysis.doctor.routing_checks import (
    check_collapse,
    check_dead_experts,
    check_imbalance,
)
from moekit.analysis.doctor.sample import DENSE, RoutingSample, measure_routing
from moekit.analysis.doctor.training import check_training_dead
from moekit.analysis.doctor.weight_files import WeightFiles
from moekit.analysis.doctor.weights import check_expert_copies, check_router_precision
from moekit.model_dir import ModelDir

# Defaults of the thresholds (see `diagnose` and docs/doctor.md).
SAMPLE_TOKENS = 4096
SAMPLE_SEQ_LEN = 256
# The one rule's nearly-dead fraction, `moekit.analysis.routing.NEARLY_DEAD_FRACTION` (spelled
# out: importing that module imports torch, and building the command line must not).
DEAD_SHARE = 0.1
IMBALANCE_WARNING = 2.0
IMBALANCE_PROBLEM = 3.0
COLLAPSE_ENTROPY = 0.1
DEAD_WINDOW = 3


@dataclass(frozen=True)
class Thresholds:
    """The doctor's thresholds (`diagnose` explains each); ValueError for a value that is
    out of range."""

    sample_tokens: int = SAMPLE_TOKENS
    seq_len: int = SAMPLE_SEQ_LEN
    dead_share: float = DEAD_SHARE
    imbalance_warning: float = IMBALANCE_WARNING
    imbalance_problem: float = IMBALANCE_PROBLEM
    collapse_entropy: float = COLLAPSE_ENTROPY
    dead_window: int = DEAD_WINDOW

    def __post_init__(self) -> None:
        for name in ("sample_tokens", "seq_len", "dead_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        for name in ("dead_share", "collapse_entropy"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be in [0, 1]")
        if not 1.0 <= self.imbalance_warning <= self.imbalance_problem:
            raise ValueError(
                f"imbalance_warning={self.imbalance_warning!r}, imbalance_problem="
                f"{self.imbalance_problem!r} are invalid: need 1 <= warning <= problem"
            )


@dataclass(frozen=True)
class Diagnosis(Sequence[Check]):
    """What `diagnose` found: one `Check` per failure mode, in report order (the diagnosis is
    a sequence of them), with the directories that were checked.

    model_dir: the model directory as given; run_dir: the training run checked, or None."""

    model_dir: str
    run_dir: str | None
    checks: tuple[Check, ...]

    @overload
    def __getitem__(self, index: int) -> Check: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Check]: ...

    def __getitem__(self, index: int | slice) -> Check | Sequence[Check]:
        return self.checks[index]

    def __len__(self) -> int:
        return len(self.checks)

    def __iter__(self) -> Iterator[Check]:
        return iter(self.checks)

    @property
    def status(self) -> Status:
        """The most serious status of the checks."""
        return worst_status(self.checks)

    def counts(self) -> dict[Status, int]:
        """How many checks have each status."""
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    def exit_code(self, *, strict: bool = False) -> int:
        """0 when no check found a problem (nor, with `strict`, a warning); 1 otherwise."""
        return exit_code(self.checks, strict=strict)

    def to_dict(self, *, strict: bool = False) -> dict[str, Any]:
        """The JSON object `moekit doctor --json` prints."""
        return {
            "model_dir": self.model_dir,
            "run_dir": self.run_dir,
            "status": self.status,
            "counts": self.counts(),
            "exit_code": self.exit_code(strict=strict),
            "checks": [c.to_dict() for c in self.checks],
        }


def diagnose(
    model_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    sample_tokens: int = SAMPLE_TOKENS,
    seq_len: int = SAMPLE_SEQ_LEN,
    device: str | None = "auto",
    dead_share: float = DEAD_SHARE,
    imbalance_warning: float = IMBALANCE_WARNING,
    imbalance_problem: float = IMBALANCE_PROBLEM,
    collapse_entropy: float = COLLAPSE_ENTROPY,
    dead_window: int = DEAD_WINDOW,
) -> Diagnosis:
    """Check the model directory `model_dir` for the silent MoE failures; one `Check` each.

    run_dir: a training run directory (metrics.jsonl, train_state/) to check as well; None
        uses `model_dir` itself when it holds either (a trained model is its own run).
    sample_tokens, seq_len: how much builtin-corpus text (all four domains, in equal parts)
        is routed through the model to measure load, in rows of `seq_len` tokens.
    device: where the sample runs ("auto": CUDA when present, else the CPU).
    dead_share: an expert with fewer routed copies than this fraction of an even share
        (copies / E) is nearly dead (warning); one with none is dead (problem). The rule is
        `moekit.analysis.routing.load_stats`, the one analyze and the training metrics use.
    imbalance_warning, imbalance_problem: max over mean copies per expert above which a
        layer's load is a warning, a problem (1.0 is perfect balance; with top-k routing the
        most possible is E / K).
    collapse_entropy: a layer whose mean routing entropy is below this fraction of log(E)
        has collapsed (problem): each token's router distribution is near one-hot.
    dead_window: in the run's metrics, an expert reported dead in each of the last
        `dead_window` logged training records is a problem; dead in the last one only, a
        warning.

    Returns the `Diagnosis` (a sequence of the checks). A config.json that cannot be read is
    a ValueError or FileNotFoundError (nothing can be checked); weights that do not load are
    reported by the checks that need them.
    """

    t = Thresholds(
        sample_tokens=sample_tokens,
        seq_len=seq_len,
        dead_share=dead_share,
        imbalance_warning=imbalance_warning,
        imbalance_problem=imbalance_problem,
        collapse_entropy=collapse_entropy,
        dead_window=dead_window,
    )
    path = Path(model_dir)
    cfg = ModelDir(path).config()
    run = resolve_run_dir(path, run_dir)
    weights = WeightFiles(path)
    sample: RoutingSample | str = DENSE
    if cfg.moe is not None:
        sample = measure_routing(
            path, cfg, tokens=t.sample_tokens, seq_len=t.seq_len, device=device
        )
    checks = (
        check_dead_experts(sample, t.dead_share),
        check_imbalance(sample, cfg, t.imbalance_warning, t.imbalance_problem),
        check_collapse(sample, t.collapse_entropy),
        check_training_dead(cfg, run, t.dead_window),
        check_selection_bias(cfg, weights, run),
        check_load_balancing(cfg),
        check_adapters(cfg, path, weights),
        check_expert_copies(cfg, weights),
        check_router_precision(cfg, weights, sample),
        check_dead_groups(sample, cfg, t.dead_share),
    )
    return Diagnosis(str(model_dir), None if run is None else str(run), checks)


def resolve_run_dir(model_dir: Path, run_dir: str | Path | None) -> Path | None:
    """The training run `diagnose` checks: `run_dir` (which must hold a run), else
    `model_dir` when it holds one, else None."""
    if run_dir is not None:
        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"run directory {run} does not exist")
        if not ModelDir(run).has_run():
            raise FileNotFoundError(
                f"{run} is not a training run directory: it has neither {ModelDir.METRICS} nor "
                f"{ModelDir.TRAIN_STATE}/"
            )
        return run
    return model_dir if ModelDir(model_dir).has_run() else None
