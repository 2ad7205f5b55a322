"""The check on a run's metrics: dead experts the training records report."""

from __future__ import annotations

import pytest

from ._fixtures import FAST, checks_of, write_metrics

# ---- 4. dead experts in the run's metrics --------------------------------------------------------


@pytest.mark.parametrize(
    ("dead", "status"),
    [
        ([{"0": 0, "1": 0}, {"0": 0, "1": 2}, {"0": 0, "1": 2}, {"0": 0, "1": 1}], "problem"),
        ([{"0": 0, "1": 0}, {"0": 0, "1": 0}, {"0": 1, "1": 0}, {"0": 0, "1": 0}], "ok"),
        ([{"0": 0, "1": 2}, {"0": 0, "1": 0}, {"0": 0, "1": 0}, {"0": 0, "1": 1}], "warning"),
    ],
)
def test_dead_experts_in_the_training_metrics(model, dead, status):
    write_metrics(model, dead)
    check = checks_of(model, **FAST)["training_dead_experts"]
    assert check.status == status, check.evidence
    assert check.data["step"] == 40
    if status == "problem":
        assert check.data["persistent_layers"] == ["1"]
        assert "last 3 training records" in check.evidence and "layer 1: 1" in check.evidence
