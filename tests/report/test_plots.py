"""The shared plots write PNG files, whatever the number of layers and experts."""

import pytest

from moekit.report import plots

PNG = b"\x89PNG\r\n\x1a\n"


def records(n: int = 6) -> list[dict]:
    train = [{"kind": "train", "step": s, "tokens": 128 * s, "loss": 5.0 - 0.1 * s}
             for s in range(1, n + 1)]  # fmt: skip
    evals = [{"kind": "eval", "step": s, "tokens": 128 * s, "val_loss": 5.2 - 0.1 * s,
              "val_by_domain": {"prose": 5.0, "code": 4.0}} for s in (3, 6)]  # fmt: skip
    return train + evals


def test_loss_curves(tmp_path):
    plots.loss_curves(records(), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG
    plots.loss_curves(records()[:3], tmp_path / "no-eval.png")  # no validation yet
    assert (tmp_path / "no-eval.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("experts", [4, 32])
def test_expert_load(tmp_path, experts):
    load = {0: [1 / experts] * experts, 3: [0.0] * (experts - 1) + [1.0]}
    plots.expert_load(load, tmp_path / "load.png")
    assert (tmp_path / "load.png").read_bytes()[:8] == PNG


def test_validation_curves(tmp_path):
    curve = [{"tokens": 100 * i, "seconds": i, "val_loss": 4 - 0.1 * i} for i in range(1, 4)]
    runs = {name: {"total_params": 2e6, "active_params": 1e6, "curve": curve}
            for name in ("moe", "dense")}  # fmt: skip
    plots.validation_curves(runs, tmp_path / "val.png")
    assert (tmp_path / "val.png").read_bytes()[:8] == PNG
