"""`moekit bench train --nproc`: the step on several processes against one."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main


def test_bench_train_on_two_expert_parallel_processes(capsys):
    from moekit.presets import get_preset

    args = ["bench", "train", "--preset", "debug", "--batch-size", "4", "--seq-len", "32"]
    assert main([*args, "--nproc", "2", "--ep", "2", "--repeats", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = get_preset("debug")
    moe_layers = cfg.num_layers - cfg.moe.first_dense_layers
    # Two exchanges per MoE layer forward (there and back) and two backward.
    assert out["all_to_all_calls_per_step"] == 4 * moe_layers
    assert 0 < out["all_to_all_share"] < 1
    assert out["tokens_per_s"] > 0 and min(out["tokens_per_s_one"]) > 0
    assert out["first_loss"] == pytest.approx(out["first_loss_one"], rel=1e-5)
    assert out["speedup"] == pytest.approx(out["tokens_per_s"] / max(out["tokens_per_s_one"]))


def test_bench_train_refuses_a_split_the_preset_cannot_take(capsys):
    args = ["bench", "train", "--preset", "debug", "--batch-size", "4", "--nproc", "2"]
    assert main([*args, "--ep", "3"]) == 2
    assert "must divide the number of processes" in capsys.readouterr().err
    assert main(["bench", "train", "--preset", "debug", "--ep", "2"]) == 2  # no --nproc
    assert "give --nproc too" in capsys.readouterr().err
