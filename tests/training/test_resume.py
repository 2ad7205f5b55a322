"""Where a run may start or continue: the library's refusals, and the command line's words
for them."""

import pytest

from moekit.cli import main
from moekit.model_dir import ModelDir
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.config import resume_run_config
from moekit.training.errors import (
    ExistingModelError,
    ExistingRunError,
    NothingToResumeError,
    NoUsableCheckpointError,
    ResumeMismatchError,
)
from moekit.training.events import TrainingObserver
from moekit.training.trainer import train

from ..conftest import TINY_RUN


def refusals(tmp_path, tiny_run_config):
    """Each refusal, raised: (exception, what the command line should say instead)."""
    cfg = tiny_run_config("train.max_steps=2")
    run = tmp_path / "run"
    train(cfg, run, verbose=False, report=False)
    model = tmp_path / "model"
    ModelDir(model).save_config(cfg.model)
    cases = [
        (lambda: train(cfg, run, verbose=False), ExistingRunError),
        (lambda: train(cfg, model, verbose=False), ExistingModelError),
        (lambda: train(cfg, tmp_path / "none", verbose=False, resume=True), NothingToResumeError),
        (lambda: resume_run_config(tmp_path / "none"), NothingToResumeError),
        (
            lambda: train(
                tiny_run_config("train.max_steps=2", "train.seed=1"),
                run,
                verbose=False,
                resume=True,
            ),
            ResumeMismatchError,
        ),
    ]
    for call, kind in cases:
        with pytest.raises(kind) as info:
            call()
        yield info.value


def test_library_refusals_name_no_command_line_flag(tmp_path, tiny_run_config):
    errors = list(refusals(tmp_path, tiny_run_config))
    assert len(errors) == 5
    for error in errors:
        assert "--" not in str(error), error
    existing, model, missing, no_run, mismatch = errors
    assert existing.step == 2 and "resume=True" in str(existing)
    assert model.files == ["config.json"] and "never overwrites a model" in str(model)
    assert str(missing).startswith("cannot resume: ") and "no checkpoint" in str(missing)
    assert "no run (no run.json)" in str(no_run)
    assert mismatch.setting == "train.seed"
    assert "train.seed was 0 in this run and cannot change to 1" in str(mismatch)


def test_the_command_line_says_them_with_its_flags(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--preset", "debug", *TINY_RUN, "train.max_steps=2", "--quiet"]
    assert main(["train", "--out", str(run), *args]) == 0
    capsys.readouterr()

    def error(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert (
        f"{run} already holds a training run (a checkpoint at step 2); pass --resume to "
        "continue it or choose another --out" in error("train", "--out", str(run), *args)
    )
    assert (
        "--resume: train.batch_size was 4 in this run and cannot change to 8 (the data order "
        "depends on it); drop that override"
        in error("train", "--out", str(run), "--resume", "train.batch_size=8", "--quiet")
    )
    assert f"--resume: {tmp_path / 'none'} holds no run (no run.json)" in error(
        "train", "--out", str(tmp_path / "none"), "--resume"
    )
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "run.json").write_text((run / "run.json").read_text())
    assert "holds no checkpoint (train_state/); start the run without --resume" in error(
        "train", "--out", str(tmp_path / "started"), "--resume", "--quiet"
    )
    assert "choose another --out (a run never overwrites a model)" in error(
        "train", "--out", str(run / "train_state" / "step-00000002"), *args
    )


class Messages(TrainingObserver):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def train_losses(run_dir):
    return [r["loss"] for r in ModelDir(run_dir).read_metrics() if r["kind"] == "train"]


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=8")  # checkpoints at steps 4 and 8
    run = tmp_path / "run"
    train(cfg, run, verbose=False, report=False)
    curve = train_losses(run)
    weights = run / "train_state" / "step-00000008" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    seen = Messages()
    result = train(cfg, run, verbose=False, report=False, resume=True, observer=seen)
    assert (
        f"skipped the checkpoint step-00000008 in {run / 'train_state'}: model.safetensors is "
        f"truncated or corrupt (it holds {len(data) // 2} bytes where its header describes "
        f"{len(data)})" == seen.lines[0]
    )
    assert result.step == 8 and len(result.history) > 0  # it trained steps 5 to 8 again
    assert train_losses(run) == curve  # bit for bit, from the older checkpoint on
    assert latest_checkpoint(run).step == 8  # rewritten whole


def test_no_usable_checkpoint_is_a_clear_refusal(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=8")
    run = tmp_path / "run"
    train(cfg, run, verbose=False, report=False)
    for step in (4, 8):
        (run / "train_state" / f"step-{step:08d}" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(NoUsableCheckpointError) as info:
        train(cfg, run, verbose=False, report=False, resume=True)
    message = str(info.value)
    assert message.startswith(f"cannot resume: no checkpoint of the run in {run} is usable ")
    assert "step-00000008: optimizer.pt is truncated or corrupt" in message
    assert "step-00000004: optimizer.pt is truncated or corrupt" in message
    assert "--" not in message
    with pytest.raises(ExistingRunError):  # and a fresh run still does not overwrite it
        train(cfg, run, verbose=False, report=False)
