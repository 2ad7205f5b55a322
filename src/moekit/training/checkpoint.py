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

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically afterwards: a crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.files import atomic_write_text, fsync_dir
from moekit.model_dir import ModelDir, load_state_checked, load_weights, save_weights


@dataclass
class Checkpoint:
    """A checkpoint found on disk; `restore()` puts it back into live objects."""

    path: Path
    step: int
    state: dict[str, Any]

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        device = next(model.parameters()).device
        load_state_checked(model, load_weights(self.path, device), str(self.path))
        try:
            # Loaded on the CPU: the optimizer moves each state to its parameter's device
            # itself (and keeps AdamW's step counters on the CPU, where they belong).
            opt_state = torch.load(
                self.path / "optimizer.pt", weights_only=True, map_location="cpu"
            )
            rng = torch.load(self.path / "rng.pt", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {self.path} is unreadable ({e})") from e
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
) -> Path:
    """Write the checkpoint of `step` (with `extra`: data position, counters) and keep only
    the newest `keep_last`. Returns its directory."""
    directory = ModelDir(run_dir)
    root = directory.train_state
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".step-*.tmp"), *root.glob(".step-*.old")]:  # from a crash
        shutil.rmtree(stale, ignore_errors=True)
    final = directory.checkpoint_dir(step)
    tmp = root / f".{final.name}.tmp"
    tmp.mkdir()
    try:
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
        for f in tmp.iterdir():
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    # Keep the newest `keep_last` up to this step; newer ones are orphans of a crashed run.
    older = [p for p in directory.checkpoints() if p.name <= final.name]
    newer = [p for p in directory.checkpoints() if p.name > final.name]
    for stale in [*older[:-keep_last], *newer]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _read(path: Path) -> Checkpoint | None:
    try:
        state = json.loads((path / "state.json").read_text())
        return Checkpoint(path=path, step=int(state["step"]), state=state)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError):
        return None


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of `run_dir`, or None when the run has none.

    Normally the one `train_state/latest` names; if that is missing or unreadable (a crash at
    the wrong moment), the newest readable `step-*` directory.
    """
    root = ModelDir(run_dir).train_state
    pointer = root / "latest"
    if pointer.exists():
        found = _read(root / pointer.read_text().strip())
        if found is not None:
            return found
    for path in reversed(ModelDir(run_dir).checkpoints()):
        found = _read(path)
        if found is not None:
            return found
    return None
