"""A tiny trained run (two steps), with the validation split its run.json describes."""

import pytest


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    from moekit import train
    from moekit.training.config import resolve_run_config
    from tests.conftest import TINY_RUN

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = resolve_run_config(preset="debug", overrides=[*TINY_RUN, "train.max_steps=2"])
    train(cfg, out, verbose=False, report=False)
    return out
