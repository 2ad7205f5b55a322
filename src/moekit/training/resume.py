"""What a run directory must hold for a run to start or to continue there.

A fresh run never overwrites a run or a model; a resumed one continues the run on disk with
the same model, data and data order. Nothing here writes: a refused start leaves the
directory as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.files import read_json
from moekit.model_dir import ModelDir
from moekit.training.checkpoint import Checkpoint, latest_checkpoint, newest_checkpoint
from moekit.training.config import RunConfig
from moekit.training.errors import (
    ExistingModelError,
    ExistingRunError,
    NothingToResumeError,
    NoUsableCheckpointError,
    ResumeMismatchError,
)

# Sections a resumed run keeps, and train settings the data order depends on.
KEPT_SECTIONS = ("model", "data", "finetune")
DATA_ORDER = ("batch_size", "seq_len", "seed")


def check_run_dir(
    run_dir: Path, cfg: RunConfig, *, resume: bool, say: Callable[[str], None] | None = None
) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (None for a fresh run), after checking
    that `run_dir` may take the run: without `resume` it holds no checkpoint and no model
    (a directory whose run never reached its first checkpoint starts again); with `resume`
    it holds a usable checkpoint of a run with the same model, data and finetune sections
    and the same data order. A newer checkpoint whose files are truncated or corrupt is
    passed over for an older one, and `say` is told which and why."""
    if not resume:
        existing = newest_checkpoint(run_dir) if run_dir.exists() else None
        if existing is not None:
            raise ExistingRunError(run_dir, existing.step)
        held = ModelDir(run_dir).model_files()
        if held:
            raise ExistingModelError(run_dir, held)
        return None
    skipped: dict[str, str] = {}

    def skip(path: Path, problem: str) -> None:
        skipped[path.name] = problem
        if say is not None:
            say(f"skipped the checkpoint {path.name} in {path.parent}: {problem}")

    checkpoint = latest_checkpoint(run_dir, on_skip=skip) if run_dir.exists() else None
    if checkpoint is None and skipped:
        raise NoUsableCheckpointError(run_dir, skipped)
    if checkpoint is None:
        raise NothingToResumeError(run_dir, "no checkpoint (train_state/)")
    saved = RunConfig.from_dict(read_json(run_dir / ModelDir.RUN_CONFIG, what="run config"))
    for section in KEPT_SECTIONS:
        if getattr(saved, section) != getattr(cfg, section):
            raise ResumeMismatchError(
                f"the {section} section differs from the run's {ModelDir.RUN_CONFIG}; a run "
                "continues with the same model and data"
            )
    for name in DATA_ORDER:
        before, now = getattr(saved.train, name), getattr(cfg.train, name)
        if before != now:
            raise ResumeMismatchError(
                f"train.{name} was {before} in this run and cannot change to {now} (the data "
                "order depends on it)",
                setting=f"train.{name}",
            )
    return checkpoint


def check_same_data(checkpoint: Checkpoint, stats: dict[str, Any]) -> None:
    """The data a resumed run prepared (its `stats`) are those the checkpoint trained on."""
    fingerprint = checkpoint.state.get("data_fingerprint")
    if fingerprint is not None and fingerprint != stats.get("fingerprint"):
        raise ResumeMismatchError(
            f"the training data changed since the checkpoint at step {checkpoint.step} "
            "(different documents or texts); resuming would not continue the same run"
        )
