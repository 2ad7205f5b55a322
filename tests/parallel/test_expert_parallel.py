"""Data and expert parallelism on 2 and 4 processes over loopback (gloo), against one process."""

from __future__ import annotations

import pytest
import torch

from tests.parallel import workers
from tests.parallel.launch import run_world


@pytest.mark.parametrize(
    ("world", "ep", "data_parallel"),
    [(2, 1, "fsdp"), (2, 2, "fsdp"), (4, 2, "fsdp"), (4, 2, "ddp")],
    ids=["dp2", "ep2", "dp2xep2", "dp2xep2-ddp"],
)
def test_split_training_matches_one_process(world, ep, data_parallel):
    # Softmax top-k with the load-balancing and z losses: the aux loss takes global fractions.
    run_world(workers.same_steps, world, ep, {"z_loss_weight": 1e-3}, data_parallel)


def test_aux_loss_free_bias_balances_on_global_counts():
    # DeepSeek-V3-like: sigmoid scores, a selection bias, a shared expert.
    moe = {"score_func": "sigmoid", "bias_update_rate": 0.05, "aux_loss_weight": 0.0,
           "num_shared_experts": 1}  # fmt: skip
    run_world(workers.same_steps, 2, 2, moe)


def test_biased_experts_and_router_split_like_one_process():
    # gpt-oss-like: a router logit bias and biases on every expert projection.
    run_world(workers.same_steps, 2, 2, {"router_bias": True, "expert_bias": True})


def test_copies_come_back_to_their_tokens():
    run_world(workers.planted_routing, 2)


def test_checkpoints_reshard_from_2_to_4_to_1_processes(tmp_path):
    from safetensors.torch import load_file

    # Saved by 2 processes (ep 2, FSDP2) after two steps; loaded by 4 (dp 2 x ep 2, DDP) with
    # identical weights, one more step, saved; loaded by one process with identical weights.
    for name in ("two", "four"):
        (tmp_path / name).mkdir()
    run_world(workers.reshard, 2, 2, str(tmp_path), None, "two")
    run_world(workers.reshard, 4, 2, str(tmp_path), "two", "four", "ddp")
    saved_by_four = load_file(str(tmp_path / "four" / "weights.safetensors"))
    one = workers.one_process_load(str(tmp_path), "four")
    for name, t in saved_by_four.items():
        torch.testing.assert_close(one[name], t, rtol=0, atol=0, msg=name)
    # The optimizer state resharded too: one process training the same three steps without
    # a checkpoint (from the weights the two processes started with) ends where the four
    # did after resuming (AdamW's moments decide the third update).
    straight = workers.straight_steps(seed=7 + 2, steps=range(3))
    for name, t in saved_by_four.items():
        torch.testing.assert_close(straight[name], t, atol=2e-5, rtol=1e-4, msg=name)


def test_a_process_that_dies_makes_the_others_fail_not_hang(tmp_path):
    import multiprocessing

    from tests.parallel.launch import free_port

    ctx = multiprocessing.get_context("spawn")
    out, port = tmp_path / "survivor.txt", free_port()
    procs = [ctx.Process(target=workers.one_dies, args=(r, 2, port, str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[0].join(timeout=120)
    alive = procs[0].is_alive()
    for p in procs:
        p.kill()
    assert not alive, "the surviving process hung"
    assert procs[1].exitcode == 3
    assert out.read_text(), "the survivor ended without an error"


def test_a_process_whose_rows_are_all_padding_keeps_in_step():
    run_world(workers.padding_only, 2)
