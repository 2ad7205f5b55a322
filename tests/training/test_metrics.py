"""Routing health in the training metrics follows the one rule of the routing trace."""

import math

import pytest
import torch

from moekit.analysis.routing import load_stats
from moekit.training.metrics import RoutingAccumulator, routing_metrics


@pytest.mark.parametrize("counts", [[5, 0, 3, 0], [7, 7, 7, 7], [50, 30, 19, 1, 0]])
def test_routing_metrics_count_dead_experts_by_the_one_rule(counts):
    m = routing_metrics(torch.tensor(counts), dropped=2, entropy=1.5)
    stats = load_stats(torch.tensor(counts))
    assert m == {"imbalance": stats.imbalance, "cv": stats.cv, "dead": len(stats.dead),
                 "dropped": 2, "entropy": 1.5}  # fmt: skip


def test_a_layer_without_copies_has_no_imbalance():
    m = routing_metrics(torch.zeros(4, dtype=torch.long), dropped=0, entropy=0.0)
    assert math.isnan(m["imbalance"]) and math.isnan(m["cv"]) and m["dead"] == 4


def test_the_accumulator_sums_a_log_window():
    acc = RoutingAccumulator()
    acc.add(1, torch.tensor([3, 0, 1, 0]), torch.tensor(1), torch.tensor(1.0))
    acc.add(1, torch.tensor([1, 0, 3, 0]), torch.tensor(2), torch.tensor(2.0))
    acc.add(0, torch.tensor([2, 2, 2, 2]), torch.tensor(0), torch.tensor(1.3))
    summary = acc.summary()
    assert list(summary) == ["0", "1"]
    assert summary["1"] == routing_metrics(torch.tensor([4, 0, 4, 0]), 3, 1.5)
    assert summary["1"]["dead"] == 2 and summary["0"]["imbalance"] == 1.0
    acc.reset()
    assert acc.summary() == {}
