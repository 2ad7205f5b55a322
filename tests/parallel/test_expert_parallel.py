"""Data and expert parallelism on 2 and 4 processes over loopback (gloo), against one process."""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.launch import run_world


@pytest.mark.parametrize(
    ("world", "ep"),
    [(2, 1), (2, 2), (4, 2)],
    ids=["dp2", "ep2", "dp2xep2"],
)
def test_split_training_matches_one_process(world, ep):
    # Softmax top-k with the load-balancing and z losses: the aux loss takes global fractions.
    run_world(workers.same_steps, world, ep, {"z_loss_weight": 1e-3})


def test_aux_loss_free_bias_balances_on_global_counts():
    moe = {"score_func": "sigmoid", "bias_update_rate": 0.05, "aux_loss_weight": 0.0}
    run_world(workers.same_steps, 2, 2, moe)


def test_copies_come_back_to_their_tokens():
    run_world(workers.planted_routing, 2)
