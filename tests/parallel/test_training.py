"""`moekit train` on several processes: the same run as on one, exact resume, resharding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from tests.conftest import TINY_RUN
from tests.parallel import workers
from tests.parallel.launch import run_world

STEPS = ["train.max_steps=6", "train.save_every=2", "train.eval_every=3"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_nproc_ep_trains_the_run_one_process_trains(tmp_path, data_parallel):
    # `--nproc 2 --ep 2` launches torchrun; the run logs the same losses, gradient norms and
    # routing statistics as one process, and writes the ordinary model directory.
    args = ["train", "--preset", "debug", *TINY_RUN, *STEPS, "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    split = ["--nproc", "2", "--ep", "2", f"train.data_parallel={data_parallel}"]
    assert main([*args, "--out", str(tmp_path / "two"), *split]) == 0
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["kind"] for r in one] == [r["kind"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        if "routing" in a:
            for layer, stats in a["routing"].items():
                assert b["routing"][layer]["dead"] == stats["dead"]
                assert b["routing"][layer]["imbalance"] == pytest.approx(stats["imbalance"])
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for name, t in w1.items():
        torch.testing.assert_close(w2[name], t, atol=1e-4, rtol=1e-4, msg=name)
    assert (tmp_path / "two" / "report" / "report.html").is_file()
    assert (tmp_path / "two" / "train_state" / "step-00000006" / "dcp" / ".metadata").is_file()


def test_resume_is_exact_and_resumes_on_another_world_size(tmp_path):
    straight, paused, alone = tmp_path / "straight", tmp_path / "paused", tmp_path / "alone"
    ep = ["train.ep=2", *STEPS]
    run_world(workers.train_run, 2, str(straight), ep, None, False)
    run_world(workers.train_run, 2, str(paused), ep, 4, False)
    # The paused run's checkpoint, copied, resumes on one process (resharded from two).
    shutil.copytree(paused, alone)
    # A save cut short (its shards without the metadata) is passed over for the one before.
    states = paused / "train_state"
    shutil.copytree(states / "step-00000004", states / "step-00000005")
    (states / "step-00000005" / "dcp" / ".metadata").unlink()
    (states / "latest").write_text("step-00000005\n")
    run_world(workers.train_run, 2, str(paused), ep, None, True)
    for name, t in _weights(straight).items():  # same processes: exactly the same run
        assert torch.equal(_weights(paused)[name], t), name
    assert [r.get("loss") for r in _metrics(paused)] == [r.get("loss") for r in _metrics(straight)]
    workers.train_here(str(alone), STEPS, resume=True)  # one process, ep 1
    for name, t in _weights(straight).items():
        torch.testing.assert_close(_weights(alone)[name], t, atol=1e-4, rtol=1e-4, msg=name)


def test_a_split_the_run_cannot_take_is_refused(tmp_path, capsys):
    base = ["train", "--preset", "debug", *TINY_RUN, "--quiet", "--out", str(tmp_path / "r")]
    assert main([*base, "train.ep=2"]) == 2
    assert "train.ep=2 splits the experts over 2 processes" in capsys.readouterr().err
    assert main([*base, "--nproc", "2", "--ep", "3"]) == 2  # refused before launching
    assert "must divide the number of processes (2)" in capsys.readouterr().err
    assert main([*base, "--nproc", "2", "train.batch_size=3"]) == 2
    assert "train.batch_size=3 does not split evenly over 2 processes" in capsys.readouterr().err
    assert main([*base, "--nproc", "2", "--ep", "2", "model.moe.num_experts=3"]) == 2
    assert "must divide the number of routed experts (3)" in capsys.readouterr().err
    assert main([*base, "--nproc", "0"]) == 2
    uneven = ["--nproc", "4", "--ep", "2", "model.moe.expert_hidden=33"]
    assert main([*base, *uneven]) == 2
    assert "model.moe.expert_hidden=33 must be a multiple of 2" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    run_world(workers.signalled, 2, str(tmp_path))
    steps = {(tmp_path / f"rank{r}").read_text() for r in (0, 1)}
    assert len(steps) == 1, steps  # the same step on both
    step = int(steps.pop())
    assert (tmp_path / "run" / "train_state" / f"step-{step:08d}" / "dcp" / ".metadata").is_file()
