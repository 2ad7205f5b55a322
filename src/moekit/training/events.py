"""What a training run reports as it goes, and what it returns.

The trainer tells one `TrainingObserver` about each event of a run; the observer decides what
to show (moekit.training.progress has the progress bar and the plain line reporter). An
observer overrides only the events it cares about: every method of the base class does
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """The end of a call of `Trainer.run()` (and of `train()`): where the run stands."""

    run_dir: Path
    step: int
    val_loss: float | None
    val_by_domain: dict[str, float]
    tokens: int
    seconds: float
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RunStarted:
    """`Trainer.run()` begins: from `step` (0, or the step resumed from) to `end` (the run's
    `max_steps`, or earlier when it pauses); `tokens` were trained on before this call."""

    step: int
    end: int
    max_steps: int
    tokens: int


@dataclass(frozen=True)
class StepDone:
    """One optimizer step finished (after its logging, evaluation and checkpoint, if any)."""

    step: int
    loss: float
    tokens: int  # trained on in the whole run, this step included


class TrainingObserver:
    """Receives a run's events. The trainer calls them in this order: `message` (any time,
    also while setting up), `started`, then per step `logged` (a metrics record, every
    `log_every` steps), `evaluated` (an eval record), `saved` (a checkpoint), `stepped`, and
    last `finished` (with the result, or None when the run stopped on an error or a signal)."""

    def message(self, text: str) -> None:
        """A line for the person running the training (data, trainable parameters, ...)."""

    def started(self, event: RunStarted) -> None:
        """The loop starts."""

    def logged(self, record: dict[str, Any]) -> None:
        """A training record, as written to metrics.jsonl."""

    def evaluated(self, record: dict[str, Any]) -> None:
        """An evaluation record (validation loss overall and per domain), as logged."""

    def saved(self, step: int, checkpoint: Path) -> None:
        """The model directory and a checkpoint of `step` were written."""

    def stepped(self, event: StepDone) -> None:
        """One optimizer step is done."""

    def finished(self, result: TrainResult | None) -> None:
        """The loop ended: `result` on success, None when an exception stops the run."""


class Observers(TrainingObserver):
    """Several observers as one: each event goes to each, in order."""

    def __init__(self, *observers: TrainingObserver | None) -> None:
        self.observers = [o for o in observers if o is not None]

    def message(self, text: str) -> None:
        for o in self.observers:
            o.message(text)

    def started(self, event: RunStarted) -> None:
        for o in self.observers:
            o.started(event)

    def logged(self, record: dict[str, Any]) -> None:
        for o in self.observers:
            o.logged(record)

    def evaluated(self, record: dict[str, Any]) -> None:
        for o in self.observers:
            o.evaluated(record)

    def saved(self, step: int, checkpoint: Path) -> None:
        for o in self.observers:
            o.saved(step, checkpoint)

    def stepped(self, event: StepDone) -> None:
        for o in self.observers:
            o.stepped(event)

    def finished(self, result: TrainResult | None) -> None:
        for o in self.observers:
            o.finished(result)
