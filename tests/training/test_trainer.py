import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import moekit.training.step as step_mod
from moekit.model_dir import ModelDir, load_model, load_weights
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.errors import (
    ExistingRunError,
    NothingToResumeError,
    ResumeMismatchError,
    RunDiskFullError,
)
from moekit.training.metrics import MetricsLog
from moekit.training.trainer import NonFiniteLossError, Trainer, train

from ..conftest import TINY_RUN, disk_full_after


def losses(run_dir, kind="train", key="loss"):
    return [r[key] for r in ModelDir(run_dir).read_metrics() if r["kind"] == kind]


def test_a_few_steps_reduce_the_loss(tmp_path, tiny_run_config):
    result = train(tiny_run_config("train.max_steps=30"), tmp_path / "run", verbose=False,
                   report=False)  # fmt: skip
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert result.val_loss is not None and result.val_loss < curve[0]
    # The model directory loads back into the same weights as the last checkpoint.
    model = load_model(tmp_path / "run")
    saved = load_weights(latest_checkpoint(tmp_path / "run").path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
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
    with pytest.raises(
        ExistingRunError,
        match=r"already holds a training run \(a checkpoint at step 2\); resume it \(resume=True\)",
    ):
        train(cfg, tmp_path / "run", verbose=False, report=False)
    other = tiny_run_config("train.max_steps=2", "model.moe.num_experts=8")
    with pytest.raises(ResumeMismatchError, match="the model section differs"):
        train(other, tmp_path / "run", verbose=False, report=False, resume=True)
    with pytest.raises(NothingToResumeError, match="holds no checkpoint"):
        train(cfg, tmp_path / "empty", verbose=False, report=False, resume=True)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_run_config, monkeypatch):
    real = step_mod.lm_loss
    calls = {"n": 0}

    def flaky(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(step_mod, "lm_loss", flaky)
    result = train(tiny_run_config("train.max_steps=6"), tmp_path / "a", verbose=False,
                   report=False)  # fmt: skip
    assert result.skipped_steps == 1 and result.step == 6

    def broken(logits, targets):
        return real(logits, targets) * float("inf")

    monkeypatch.setattr(step_mod, "lm_loss", broken)
    with pytest.raises(NonFiniteLossError, match="not finite in 3 consecutive steps"):
        train(tiny_run_config("train.max_steps=6", "train.max_nonfinite=3"), tmp_path / "b",
              verbose=False, report=False)  # fmt: skip


def test_metrics_and_report(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=4", 'train.samples=["def "]')
    train(cfg, tmp_path / "run", verbose=False)
    records = ModelDir(tmp_path / "run").read_metrics()
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


def test_resume_applies_new_train_settings_and_refuses_data_order_changes(
    tmp_path, tiny_run_config
):
    cfg = tiny_run_config("train.max_steps=6")
    train(cfg, tmp_path / "run", verbose=False, report=False, stop_after=3)
    run_json = (tmp_path / "run" / "run.json").read_text()
    with pytest.raises(
        ValueError, match=r"train\.batch_size was 4 in this run and cannot change to 8"
    ):
        train(tiny_run_config("train.max_steps=6", "train.batch_size=8"), tmp_path / "run",
              verbose=False, report=False, resume=True)  # fmt: skip
    assert (
        tmp_path / "run" / "run.json"
    ).read_text() == run_json  # a refused resume writes nothing
    faster = tiny_run_config("train.max_steps=6", "train.lr=0.01", "train.weight_decay=0.5")
    trainer = Trainer(faster, tmp_path / "run", resume=True, verbose=False)
    from moekit.training.optim import lr_factor

    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.01 * lr_factor(3, faster.train)
    )
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.5
    trainer.run()
    lrs = losses(tmp_path / "run", key="lr")
    assert lrs[3] == pytest.approx(0.01 * lr_factor(3, faster.train))


def test_a_failed_start_leaves_the_directory_restartable(tmp_path, tiny_run_config):
    with pytest.raises(ValueError, match=r"fewer than train\.batch_size=100000"):
        train(tiny_run_config("train.batch_size=100000"), tmp_path / "run", verbose=False)
    assert not (tmp_path / "run" / "run.json").exists()
    train(tiny_run_config("train.max_steps=2"), tmp_path / "run", verbose=False, report=False)
    # A directory with a run config but no checkpoint (a start stopped early) restarts too.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "run.json").write_text((tmp_path / "run" / "run.json").read_text())
    train(tiny_run_config("train.max_steps=2"), tmp_path / "again", verbose=False, report=False)


def test_checkpoints_survive_a_dangling_pointer_and_a_torn_metrics_line(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=8", "train.save_every=2", "train.keep_last=3")
    train(cfg, tmp_path / "run", verbose=False, report=False, stop_after=4)
    state = tmp_path / "run" / "train_state"
    (state / "latest").write_text("step-00000099\n")  # names nothing: a crash mid-update
    assert latest_checkpoint(tmp_path / "run").step == 4
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a crash mid-line
    train(cfg, tmp_path / "run", verbose=False, report=False, resume=True)
    assert [
        r["step"] for r in ModelDir(tmp_path / "run").read_metrics() if r["kind"] == "train"
    ] == list(range(1, 9))
    assert [p.name for p in sorted(state.glob("step-*"))] == [
        "step-00000004",
        "step-00000006",
        "step-00000008",
    ]


def test_non_finite_numbers_are_logged_as_null(tmp_path, tiny_run_config, monkeypatch):
    real = step_mod.lm_loss

    def broken(logits, targets):
        return real(logits, targets) * float("nan")

    monkeypatch.setattr(step_mod, "lm_loss", broken)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        train(tiny_run_config("train.max_steps=6", "train.max_nonfinite=2"), tmp_path / "run",
              verbose=False, report=False)  # fmt: skip
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines and all("NaN" not in line for line in lines)
    assert json.loads(lines[0])["loss"] is None


def test_tensorboard_events_when_installed(tmp_path, tiny_run_config):
    pytest.importorskip("tensorboard")
    train(tiny_run_config("train.max_steps=2"), tmp_path / "run", verbose=False, report=False)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_save_a_checkpoint_then_resume_finishes(tmp_path, sig):
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
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err.decode()
    assert f"{sig.name} received: saved a checkpoint at step".encode() in err
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


# A save writes the model directory's weights, then the checkpoint's: the disk fills at the
# second save (step 8), in the one or in the other.
@pytest.mark.parametrize("files_written", [2, 3], ids=["model-weights", "checkpoint"])
def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path, tiny_run_config, monkeypatch, files_written
):
    cfg = tiny_run_config("train.max_steps=8")
    train(cfg, tmp_path / "full", verbose=False, report=False)
    run = tmp_path / "run"
    disk_full_after(monkeypatch, files_written)
    with pytest.raises(RunDiskFullError) as info:
        train(cfg, run, verbose=False, report=False)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "--" not in message
    assert message.startswith("the disk is full: could not write ")
    assert message.endswith(
        f"; the run stopped at step 8; the last complete checkpoint (step 4) is in "
        f"{run / 'train_state'}: free some space and resume the run (resume=True)"
    )
    assert info.value.step == 8 and info.value.checkpoint_step == 4
    assert latest_checkpoint(run).step == 4
    leftovers = [p.name for p in run.rglob(".*") if p.parent.name != "tensorboard"]
    assert leftovers == []
    assert load_model(run) is not None  # the model directory is whole (step 4's or 8's)
    train(cfg, run, verbose=False, report=False, resume=True)
    assert losses(run) == losses(tmp_path / "full")


def test_a_full_disk_at_the_metrics_stops_the_run(tmp_path, tiny_run_config, monkeypatch):
    cfg = tiny_run_config("train.max_steps=8")
    real = MetricsLog.log

    def log(self, record):
        if record["step"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(MetricsLog, "log", log)
    with pytest.raises(RunDiskFullError) as info:
        train(cfg, tmp_path / "run", verbose=False, report=False)
    monkeypatch.undo()
    assert str(info.value).startswith(
        f"the disk is full: could not write {tmp_path / 'run' / 'metrics.jsonl'}"
    )
    assert "the run stopped at step 6; the last complete checkpoint (step 4)" in str(info.value)
    train(cfg, tmp_path / "run", verbose=False, report=False, resume=True)
    assert [r["step"] for r in ModelDir(tmp_path / "run").read_metrics() if r["kind"] == "train"] \
        == list(range(1, 9))  # fmt: skip
