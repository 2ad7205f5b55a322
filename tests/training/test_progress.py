"""The run's events (the observer interface) and the console's ways of showing them."""

import pytest

from moekit.training import progress
from moekit.training.errors import NonFiniteLossError
from moekit.training.events import RunStarted, StepDone, TrainingObserver, TrainResult
from moekit.training.trainer import train


class Recorder(TrainingObserver):
    def __init__(self):
        self.events = []

    def message(self, text):
        self.events.append(("message", text))

    def started(self, event):
        self.events.append(("started", event))

    def logged(self, record):
        self.events.append(("logged", record["step"]))

    def evaluated(self, record):
        self.events.append(("evaluated", record["step"]))

    def saved(self, step, checkpoint):
        self.events.append(("saved", step, checkpoint.name))

    def stepped(self, event):
        self.events.append(("stepped", event.step))

    def finished(self, result):
        self.events.append(("finished", result))


def test_a_run_reports_its_events_in_order(tmp_path, tiny_run_config, capsys):
    recorder = Recorder()
    cfg = tiny_run_config("train.max_steps=4", "train.log_every=2", "train.eval_every=2",
                          "train.save_every=4")  # fmt: skip
    result = train(cfg, tmp_path / "run", verbose=False, report=False, observer=recorder)
    events = recorder.events
    assert [e[0] for e in events[:2]] == ["message", "message"]  # the data, before the start
    assert events[2] == ("started", RunStarted(step=0, end=4, max_steps=4, tokens=0))
    assert events[3:] == [
        ("stepped", 1),
        ("logged", 2), ("evaluated", 2), ("stepped", 2),
        ("stepped", 3),
        ("logged", 4), ("evaluated", 4), ("saved", 4, "step-00000004"), ("stepped", 4),
        ("finished", result),
    ]  # fmt: skip
    assert isinstance(result, TrainResult)
    # Without verbose the run prints nothing: what is shown is the observers' business.
    assert capsys.readouterr().err == ""


def test_a_stopped_run_still_finishes_its_observers(tmp_path, tiny_run_config, monkeypatch):
    import moekit.training.step as step_mod

    real = step_mod.lm_loss
    monkeypatch.setattr(step_mod, "lm_loss", lambda lo, t: real(lo, t) * float("nan"))
    recorder = Recorder()
    with pytest.raises(NonFiniteLossError):
        train(tiny_run_config("train.max_steps=4", "train.max_nonfinite=2"), tmp_path / "run",
              verbose=False, report=False, observer=recorder)  # fmt: skip
    assert recorder.events[-1] == ("finished", None)


def test_the_line_reporter_prints_a_line_per_logged_step_and_evaluation(capsys):
    lines = progress.LineReporter()
    lines.message("preparing data ...")
    lines.started(RunStarted(step=0, end=5, max_steps=10, tokens=0))
    lines.logged({"step": 5, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 12345.6})
    lines.evaluated({"step": 5, "val_loss": 2.25, "val_ppl": 9.4877})
    lines.stepped(StepDone(step=5, loss=2.5, tokens=100))
    lines.finished(None)
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [
        "preparing data ...",
        "step 5/10  loss 2.5000  lr 1.00e-03  12,346 tok/s",  # of the run's max_steps
        "step 5: val loss 2.2500 (ppl 9.5)",
    ]


def test_the_console_observer_follows_verbose_and_the_terminal(monkeypatch, capsys):
    from rich.console import Console

    quiet = progress.console_observer(False)
    assert type(quiet) is TrainingObserver
    quiet.message("not shown")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: False))
    assert type(progress.console_observer(True)) is progress.LineReporter
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    bar = progress.console_observer(True)
    assert isinstance(bar, progress.ProgressBar)
    bar.started(RunStarted(step=2, end=6, max_steps=6, tokens=64))
    bar.logged({"step": 3, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0})  # the bar shows it
    bar.stepped(StepDone(step=3, loss=1.5, tokens=96))
    task = bar._progress.tasks[0]
    assert (task.completed, task.total, task.fields["loss"]) == (3, 6, 1.5)
    assert task.fields["tps"] > 0
    bar.finished(None)
    assert bar._progress is None
    assert "step 3/6" not in capsys.readouterr().err
