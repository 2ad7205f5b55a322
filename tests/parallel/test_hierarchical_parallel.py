"""Hierarchical routing under data and expert parallelism: routing happens before dispatch, so a
split model trains as one process does, both balance losses and both biases included."""

from __future__ import annotations

from tests.parallel import workers
from tests.parallel.launch import run_world


def test_hierarchical_routing_splits_like_one_process():
    moe = {"router": "hierarchical", "router_groups": 4, "group_top_k": 2, "z_loss_weight": 1e-3,
           "bias_update_rate": 0.05, "group_bias_update_rate": 0.05}  # fmt: skip
    run_world(workers.same_steps, 2, 2, moe)
