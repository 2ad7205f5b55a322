"""How a run shows its progress on the console (stderr): a rich progress bar on a terminal
(step, loss, tokens/s, elapsed time and ETA), one plain line per logged step elsewhere (a log
file, CI), and the run's messages in both."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from moekit.training.events import RunStarted, StepDone, TrainingObserver, TrainResult


def console_observer(verbose: bool) -> TrainingObserver:
    """What `train(verbose=...)` shows: nothing unless `verbose`; a progress bar when stderr
    is a terminal, else a line per logged step."""
    if not verbose:
        return TrainingObserver()
    from rich.console import Console

    return ProgressBar() if Console(stderr=True).is_terminal else LineReporter()


class LineReporter(TrainingObserver):
    """Messages, one line per logged training record and one per evaluation, on stderr."""

    def __init__(self) -> None:
        self.max_steps = 0

    def message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def started(self, event: RunStarted) -> None:
        self.max_steps = event.max_steps

    def logged(self, record: dict[str, Any]) -> None:
        self.message(
            f"step {record['step']}/{self.max_steps}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        )

    def evaluated(self, record: dict[str, Any]) -> None:
        self.message(
            f"step {record['step']}: val loss {record['val_loss']:.4f} "
            f"(ppl {record['val_ppl']:.1f})"
        )


class ProgressBar(LineReporter):
    """A live bar instead of the per-step lines; messages and evaluations print above it."""

    def __init__(self) -> None:
        super().__init__()
        self._progress: Any = None
        self._task: Any = None
        self._started_at = 0.0
        self._start_tokens = 0

    def started(self, event: RunStarted) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().started(event)
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task(
            "train", total=event.end, completed=event.step, loss=math.nan, tps=0.0
        )
        self._started_at, self._start_tokens = time.perf_counter(), event.tokens
        self._progress.start()

    def logged(self, record: dict[str, Any]) -> None:
        pass  # the bar shows it

    def stepped(self, event: StepDone) -> None:
        seconds = max(time.perf_counter() - self._started_at, 1e-9)
        rate = (event.tokens - self._start_tokens) / seconds
        self._progress.update(self._task, completed=event.step, loss=event.loss, tps=rate)

    def finished(self, result: TrainResult | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
