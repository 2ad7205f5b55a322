"""Commands end to end through `main`, as a user calls them."""

import json

from moekit.cli import main

from ..conftest import TINY_RUN


def test_doctor_command(tiny_model_dir, capsys):
    code = main(["doctor", str(tiny_model_dir), "--json", "--tokens", "512"])
    report = json.loads(capsys.readouterr().out)
    assert code == report["exit_code"] == (1 if report["counts"]["problem"] else 0)
    names = {c["name"] for c in report["checks"]}
    assert {"dead_experts", "router_collapse", "expert_copies", "router_precision"} <= names
    assert main(["doctor", "/nonexistent/model"]) == 2


def test_analyze_command(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_model_dir), "--out", str(out), "--max-tokens", "1024",
                 "--seq-len", "64", "--quiet", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "analysis.json").read_text())
    assert (out / "report.html").stat().st_size > 10_000
    assert main(["analyze", "/nonexistent/model", "--out", str(tmp_path / "x")]) == 2


def test_compare_without_a_config_runs_the_demo_recipe(tmp_path, capsys):
    # As `make demo` does: with neither --config nor --preset, the demo recipe (its data and
    # training settings) is the base the overrides apply to.
    out = tmp_path / "cmp"
    argv = ["compare", "--out", str(out), "--quiet", "--json", *TINY_RUN,
            "train.max_steps=2", "train.eval_every=2"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) >= {"moe", "dense_active"}
    run = json.loads((out / "moe" / "run.json").read_text())
    assert run["train"]["samples"] == ["def ", "The ", "12 + 7 = ", '{"name": ']  # the recipe's
    assert run["data"]["val_fraction"] == 0.05


def test_bench_layer_rejects_unknown_shapes(capsys):
    assert main(["bench", "layer", "--shapes", "huge"]) == 2
    assert "unknown shape" in capsys.readouterr().err


def test_a_full_disk_stops_train_with_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= 2:  # the first save (model and checkpoint) goes through
            return real(tensors, filename, metadata=metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    argv = ["train", "--preset", "debug", "--out", str(out), "--quiet", *TINY_RUN,
            "train.max_steps=8", "train.save_every=4"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "disk" in err and "the run stopped at step 8" in err
    assert f"moekit train --out {out} --resume" in err and "step 4" in err
