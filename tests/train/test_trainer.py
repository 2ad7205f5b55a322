import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import moekit.train.trainer as trainer_mod
from moekit.io import load_model, load_weights
from moekit.train.checkpoint import latest_checkpoint
from moekit.train.metrics import read_metrics
from moekit.train.trainer import NonFiniteLossError, train

from .conftest import TINY_RUN


def losses(run_dir, kind="train", key="loss"):
    return [r[key] for r in read_metrics(run_dir) if r["kind"] == kind]


def test_a_few_steps_reduce_the_loss(tmp_path, tiny_run_config):
    result = train(tiny_run_config("train.max_steps=30"), tmp_path / "run", verbose=False,
                   report=False)  # fmt: skip
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert result.val_loss is not None and result.val_loss < curve[0]
    # The model directory loads back into the same weights.
    model = load_model(tmp_path / "run")
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 512)


def test_resume_continues_exactly(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=8", "model.moe.score_func=sigmoid",
                          "model.moe.bias_update_rate=0.01", "model.moe.router_jitter=0.1")  # fmt: skip
    train(cfg, tmp_path / "full", verbose=False, report=False)
    train(cfg, tmp_path / "split", verbose=False, report=False, stop_after=4)
    assert latest_checkpoint(tmp_path / "split").step == 4
    train(cfg, tmp_path / "split", verbose=False, report=False, resume=True)
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(full) == len(split) == 8
    assert full == split  # bit for bit, step for step
    assert losses(tmp_path / "full", "eval", "val_loss") == losses(
        tmp_path / "split", "eval", "val_loss"
    )
    a, b = load_weights(tmp_path / "full"), load_weights(tmp_path / "split")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The aux-loss-free biases moved and were saved with the weights.
    biases = [t for n, t in a.items() if n.endswith("selection_bias")]
    assert len(biases) == 2 and any(b.abs().sum() > 0 for b in biases)


def test_existing_runs_are_not_overwritten(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=2")
    train(cfg, tmp_path / "run", verbose=False, report=False)
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train(cfg, tmp_path / "run", verbose=False, report=False)
    other = tiny_run_config("train.max_steps=2", "model.moe.num_experts=8")
    with pytest.raises(ValueError, match="the model section differs"):
        train(other, tmp_path / "run", verbose=False, report=False, resume=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(cfg, tmp_path / "empty", verbose=False, report=False, resume=True)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_run_config, monkeypatch):
    real = trainer_mod.lm_loss
    calls = {"n": 0}

    def flaky(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_mod, "lm_loss", flaky)
    result = train(tiny_run_config("train.max_steps=6"), tmp_path / "a", verbose=False,
                   report=False)  # fmt: skip
    assert result.skipped_steps == 1 and result.step == 6

    def broken(logits, targets):
        return real(logits, targets) * float("inf")

    monkeypatch.setattr(trainer_mod, "lm_loss", broken)
    with pytest.raises(NonFiniteLossError, match="not finite in 3 consecutive steps"):
        train(tiny_run_config("train.max_steps=6", "train.max_nonfinite=3"), tmp_path / "b",
              verbose=False, report=False)  # fmt: skip


def test_metrics_and_report(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=4", 'train.samples=["def "]')
    train(cfg, tmp_path / "run", verbose=False)
    records = read_metrics(tmp_path / "run")
    step = next(r for r in records if r["kind"] == "train")
    assert set(step["routing"]) == {"0", "1"}
    assert set(step["routing"]["0"]) == {"imbalance", "cv", "dead", "dropped", "entropy"}
    assert step["tokens_per_s"] > 0 and step["lr"] > 0
    ev = next(r for r in records if r["kind"] == "eval")
    assert set(ev["val_by_domain"]) == {"prose", "code", "arithmetic", "records"}
    report = tmp_path / "run" / "report"
    for name in ("loss.png", "expert_load.png", "samples.json", "summary.json", "report.html"):
        assert (report / name).stat().st_size > 0, name
    samples = json.loads((report / "samples.json").read_text())
    assert samples[0]["prompt"] == "def "
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_then_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "moekit.cli", "train", "--preset", "debug", "--out",
           str(run_dir), *TINY_RUN, "train.max_steps=400", "train.save_every=1000"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"SIGINT received: saved a checkpoint at step" in err
    step = latest_checkpoint(run_dir).step
    assert 3 <= step < 400
    assert losses(run_dir)[-1] is not None and len(losses(run_dir)) == step
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "moekit.cli",
            "train",
            "--out",
            str(run_dir),
            "--resume",
            "train.max_steps=" + str(step + 2),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == step + 2
