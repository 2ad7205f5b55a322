"""Why a training run stops or refuses to start, as exceptions a caller can tell apart.

Messages speak of the library's terms (`resume=True`, the run directory); each exception
also carries the figures it names, so a command line can say the same in its own flags.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from moekit.files import DiskFullError
from moekit.model_dir import ModelDir


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


class NoUsableCheckpointError(ValueError):
    """Resuming was asked for, but every checkpoint of the run is truncated or corrupt;
    `problems` says, per checkpoint directory name, what is wrong with it."""

    def __init__(self, run_dir: Path, problems: dict[str, str]) -> None:
        listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
        super().__init__(
            f"cannot resume: no checkpoint of the run in {run_dir} is usable ({listed}); "
            f"restore {ModelDir.TRAIN_STATE}/ from a copy, or train into another directory"
        )
        self.run_dir = run_dir
        self.problems = problems


class RunDiskFullError(DiskFullError):
    """A write of a running training run (its model, a checkpoint, its metrics) found the disk
    full, and the run stopped at `step`. `checkpoint_step` is the newest complete checkpoint
    it leaves (None: none was written yet), which a resumed run continues from."""

    def __init__(
        self, cause: DiskFullError, run_dir: Path, step: int, checkpoint_step: int | None
    ) -> None:
        super().__init__(cause.path, cause.needed, cause.free, cause.what)
        self.cause, self.run_dir = cause, run_dir
        self.step, self.checkpoint_step = step, checkpoint_step

    def __str__(self) -> str:
        if self.checkpoint_step is None:
            kept = "no checkpoint was written yet"
        else:
            kept = (
                f"the last complete checkpoint (step {self.checkpoint_step}) is in "
                f"{ModelDir(self.run_dir).train_state}: free some space and resume the run "
                "(resume=True)"
            )
        return f"{self.problem}; the run stopped at step {self.step}; {kept}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cause, self.run_dir, self.step, self.checkpoint_step))
