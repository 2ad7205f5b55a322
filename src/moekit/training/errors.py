"""Why a training run stops or refuses to start, as exceptions a caller can tell apart.

Messages speak of the library's terms (`resume=True`, the run directory); each exception
also carries the figures it names, so a command line can say the same in its own flags.
"""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingInterruptedError(Exception):
    """Raised after a SIGINT/SIGTERM checkpoint has been written."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved a checkpoint at step {step} in {run_dir}")
        self.signum = signum
        self.step = step


class NonFiniteLossError(RuntimeError):
    """The loss was not finite in `train.max_nonfinite` consecutive steps."""


class ExistingRunError(ValueError):
    """The run directory holds a training run (a checkpoint at `step`) and resuming was not
    asked for."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(
            f"{run_dir} already holds a training run (a checkpoint at step {step}); resume it "
            "(resume=True) or train into another directory"
        )
        self.run_dir = run_dir
        self.step = step


class ExistingModelError(ValueError):
    """The run directory holds a model (`files`) and no training run: a run never overwrites
    a model."""

    def __init__(self, run_dir: Path, files: list[str]) -> None:
        super().__init__(
            f"{run_dir} already holds a model ({', '.join(files)}) and no training run to "
            "continue; train into another directory (a run never overwrites a model)"
        )
        self.run_dir = run_dir
        self.files = files


class NothingToResumeError(FileNotFoundError):
    """Resuming was asked for, but the run directory holds nothing to resume (`missing` says
    what is not there)."""

    def __init__(self, run_dir: Path, missing: str) -> None:
        super().__init__(f"cannot resume: {run_dir} holds {missing}")
        self.run_dir = run_dir
        self.missing = missing


class ResumeMismatchError(ValueError):
    """The run cannot continue as configured: `problem` says what differs from the run on
    disk; `setting` is the train setting that may not change, when one is to blame."""

    def __init__(self, problem: str, *, setting: str | None = None) -> None:
        super().__init__(f"cannot resume: {problem}")
        self.problem = problem
        self.setting = setting
