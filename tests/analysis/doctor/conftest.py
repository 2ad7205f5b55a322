"""Fixtures of the doctor tests: a fresh copy of the tiny model, and a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._fixtures import TINY_TRAIN, copy_model


@pytest.fixture
def model(tmp_path, tiny_model_dir) -> Path:
    """A fresh copy of the random-init debug model (2 MoE layers, 8 experts, top-2)."""
    return copy_model(tiny_model_dir, tmp_path / "model")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, _private_cache) -> Path:
    """A tiny MoE trained for 24 steps with aux-loss-free balancing (sigmoid scores, a
    selection bias updated every step) and an aux loss; checkpoints every 8 steps."""
    from moekit.training.config import resolve_run_config
    from moekit.training.trainer import train

    cfg = resolve_run_config(
        preset="debug",
        overrides=[*TINY_TRAIN, "train.max_steps=24", "train.save_every=8",
                   "model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.001"],
    )  # fmt: skip
    out = tmp_path_factory.mktemp("trained") / "run"
    train(cfg, out, verbose=False, report=False)
    return out
