"""Training checkpoints: everything needed to continue a run exactly where it stopped.

```
RUN_DIR/train_state/
  latest                  the name of the newest complete checkpoint, e.g. "step-00000200"
  step-00000200/
    model.safetensors     weights and buffers (router selection biases included)
    optimizer.pt          optimizer state (torch.save; loaded with weights_only=True)
    rng.pt                torch RNG states
    state.json            step, scheduler, data position, Python RNG, run counters
```

A run on several processes (moekit.parallel) writes `dcp/` instead of model.safetensors and
optimizer.pt: a Distributed Checkpoint of the model and optimizer, every process writing its
own shards (`moekit.parallel.checkpoint`). It resumes on any number of processes and any
expert-parallel size, one process included.

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically afterwards: a crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moekit.files import DiskFullError, atomic_write_text, disk_full, fsync_dir
from moekit.model_dir import (
    ModelDir,
    UnreadableWeightsError,
    load_state_checked,
    load_weights,
    save_weights,
    stored_tensors,
)
from moekit.parallel.checkpoint import load_sharded, save_sharded
from moekit.parallel.mesh import Parallel

SHARDED = "dcp"  # a checkpoint's Distributed Checkpoint directory


@dataclass
class Checkpoint:
    """A checkpoint found on disk; `restore()` puts it back into live objects."""

    path: Path
    step: int
    state: dict[str, Any]

    @property
    def sharded(self) -> bool:
        """Whether several processes wrote it (a Distributed Checkpoint in `dcp/`)."""
        return (self.path / SHARDED).is_dir()

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        parallel: Parallel | None = None,
    ) -> None:
        """Put the checkpoint back into the live objects (with `parallel`: a model split by
        `moekit.parallel.parallelize`, every process calling this)."""
        if self.sharded:
            load_sharded(self.path / SHARDED, model, optimizer, parallel)
        elif parallel is not None:
            raise ValueError(
                f"checkpoint {self.path} was written by one process: resume it on one process "
                "(a run on several processes writes checkpoints that resume on any number)"
            )
        else:
            device = next(model.parameters()).device
            load_state_checked(model, load_weights(self.path, device), str(self.path))
        try:
            # Loaded on the CPU: the optimizer moves each state to its parameter's device
            # itself (and keeps AdamW's step counters on the CPU, where they belong).
            opt_state = (
                None
                if self.sharded
                else torch.load(self.path / "optimizer.pt", weights_only=True, map_location="cpu")
            )
            rng = torch.load(self.path / "rng.pt", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {self.path} is unreadable ({e})") from e
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(self.state["scheduler"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
        version, internal, gauss = self.state["python_rng"]
        random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    *,
    keep_last: int,
    parallel: Parallel | None = None,
) -> Path:
    """Write the checkpoint of `step` (with `extra`: data position, counters) and keep only
    the newest `keep_last`. Returns its directory. With `parallel` every process calls this
    and writes its shards; the main process writes the rest.

    A full disk is a DiskFullError naming the checkpoint; what was written of it is removed,
    and the earlier checkpoints are left as they were."""
    if parallel is not None:
        return _save_sharded(run_dir, step, model, optimizer, scheduler, extra, keep_last, parallel)
    directory = ModelDir(run_dir)
    final, tmp = directory.checkpoint_dir(step), _tmp_dir(directory, step)
    _clear_leftovers(directory)
    try:
        _write(tmp, final, step, model, optimizer, scheduler, extra)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # Measured after the partial checkpoint is gone: the message says what is free now.
        needed = _tensor_bytes(model.state_dict()) + _tensor_bytes(optimizer.state_dict())
        full = disk_full(err, tmp, needed=needed) if isinstance(err, Exception) else None
        if full is None:
            raise
        what = f"the checkpoint of step {step} ({final})"
        raise DiskFullError(final, needed, full.free, what) from err
    _publish(directory, final, keep_last)
    return final


def _tmp_dir(directory: ModelDir, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place."""
    return directory.train_state / f".{directory.checkpoint_dir(step).name}.tmp"


def _clear_leftovers(directory: ModelDir) -> None:
    """Create train_state/ and remove what a crash left in it (half-written checkpoints)."""
    root = directory.train_state
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".step-*.tmp"), *root.glob(".step-*.old")]:
        shutil.rmtree(stale, ignore_errors=True)


def _publish(directory: ModelDir, final: Path, keep_last: int) -> None:
    """Point `latest` at the checkpoint just written and drop the ones no longer kept."""
    atomic_write_text(directory.train_state / "latest", final.name + "\n")
    # Keep the newest `keep_last` up to this step; newer ones are orphans of a crashed run.
    older = [p for p in directory.checkpoints() if p.name <= final.name]
    newer = [p for p in directory.checkpoints() if p.name > final.name]
    for stale in [*older[:-keep_last], *newer]:
        shutil.rmtree(stale, ignore_errors=True)


def _save_sharded(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    keep_last: int,
    parallel: Parallel,
) -> Path:
    """`save_checkpoint` on several processes: the shards into `tmp/dcp` by every process,
    then the main process writes the rest and renames `tmp` into place as `_write` does."""
    directory = ModelDir(run_dir)
    final, tmp = directory.checkpoint_dir(step), _tmp_dir(directory, step)
    if parallel.is_main:
        _clear_leftovers(directory)
        tmp.mkdir()
    dist.barrier(group=parallel.world_group)
    save_sharded(tmp / SHARDED, model, optimizer, parallel)
    dist.barrier(group=parallel.world_group)
    if parallel.is_main:
        _write(tmp, final, step, None, None, scheduler, extra)
        _publish(directory, final, keep_last)
    dist.barrier(group=parallel.world_group)
    return final


def _write(
    tmp: Path,
    final: Path,
    step: int,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
) -> None:
    """Write the checkpoint into `tmp`, fsync it and rename it to `final`."""
    root = tmp.parent
    if model is not None and optimizer is not None:  # else: shards already in tmp/dcp
        tmp.mkdir()
        save_weights(model.state_dict(), tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    version, internal, gauss = random.getstate()
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "python_rng": [version, list(internal), gauss],
        **extra,
    }
    atomic_write_text(tmp / "state.json", json.dumps(state) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    # Saving the same step again: move the old copy aside rather than deleting it first,
    # so some complete copy of this step exists at every moment.
    old = root / f".{final.name}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in a (nested) state dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _read(path: Path) -> Checkpoint | None:
    try:
        state = json.loads((path / "state.json").read_text())
        return Checkpoint(path=path, step=int(state["step"]), state=state)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError):
        return None


def _candidates(run_dir: Path) -> list[Path]:
    """The checkpoint directories of `run_dir` in the order they are tried: the one
    `train_state/latest` names, then every `step-*` directory, newest first."""
    root = ModelDir(run_dir).train_state
    named: list[Path] = []
    pointer = root / "latest"
    if pointer.exists():
        try:
            named = [root / pointer.read_text().strip()]
        except (OSError, UnicodeDecodeError):
            named = []
    others = [p for p in reversed(ModelDir(run_dir).checkpoints()) if p not in named]
    return [*named, *others]


def newest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of `run_dir` whose state.json reads, without looking at its other
    files: whether the directory holds a run at all."""
    for path in _candidates(run_dir):
        found = _read(path)
        if found is not None:
            return found
    return None


def latest_checkpoint(
    run_dir: Path, *, on_skip: Callable[[Path, str], None] | None = None
) -> Checkpoint | None:
    """The newest complete checkpoint of `run_dir`, or None when the run has none.

    Normally the one `train_state/latest` names; if that is missing or unreadable (a crash at
    the wrong moment), or its files are truncated or corrupt (`checkpoint_problem`), the next
    newest one whose files are whole. `on_skip(path, problem)` is told of each checkpoint
    passed over, and why."""
    for path in _candidates(run_dir):
        found = _read(path)
        problem = "its state.json is missing or unreadable" if found is None else None
        problem = problem or checkpoint_problem(path)
        if problem is None:
            return found
        if on_skip is not None and path.is_dir():
            on_skip(path, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be restored, from a cheap look at its files, or
    None when they look whole: the weights' safetensors headers must parse and agree with
    the files' sizes, and optimizer.pt and rng.pt must load (memory-mapped: their tensor data
    is not read); a sharded checkpoint's `dcp/` must hold its metadata."""
    if (path / SHARDED).is_dir():
        if not (path / SHARDED / ".metadata").is_file():
            return f"{SHARDED}/.metadata is missing (the distributed checkpoint is incomplete)"
        names: tuple[str, ...] = ("rng.pt",)
    else:
        names = ("optimizer.pt", "rng.pt")
        try:
            stored_tensors(path)
        except UnreadableWeightsError as e:
            return f"{e.path.name} is truncated or corrupt ({e.reason})"
        except (ValueError, FileNotFoundError) as e:
            return str(e)
    for name in names:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            torch.load(file, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:  # torch raises RuntimeError, pickle and zip errors alike
            first = " ".join(str(e).split()).split(". ")[0]  # torch adds paragraphs of advice
            return f"{name} is truncated or corrupt ({first})"
    return None
