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

from moekit.io import _fsync_dir, atomic_write_text, load_state_checked, load_weights, save_weights

STATE_DIR = "train_state"


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
            opt_state = torch.load(
                self.path / "optimizer.pt", weights_only=True, map_location=device
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


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


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
    root = run_dir / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / _step_name(step)
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
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return sorted((run_dir / STATE_DIR).glob("step-*"))


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of `run_dir`, or None when the run has none."""
    root = run_dir / STATE_DIR
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} named by {pointer} is unreadable ({e})") from e
    return Checkpoint(path=path, step=int(state["step"]), state=state)
