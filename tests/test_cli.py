"""The `moekit` console script, run as a user runs it."""

import json
import shutil
import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.config import ModelConfig
from moekit.params import count_params
from moekit.presets import PRESETS, get_preset

MOEKIT = shutil.which("moekit") or ""


def run(*args, check=True):
    cmd = [MOEKIT, *args] if MOEKIT else [sys.executable, "-m", "moekit.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info_json_for_a_preset():
    data = json.loads(run("info", "mixtral-8x7b", "--json").stdout)
    assert isinstance(data["total_params"], int) and isinstance(data["active_params"], int)
    assert data["total_params"] == pytest.approx(46.7e9, rel=0.03)
    assert data["active_params"] == pytest.approx(12.9e9, rel=0.03)
    assert set(data["weight_memory_bytes"]) == {"fp32", "bf16", "int8", "int4"}
    assert data["flops_per_token"] > 2 * data["active_params"] * 0.9


def test_info_table_names_every_figure():
    out = run("info", "deepseek-v3").stdout
    for needle in ("total parameters", "active parameters", "active fraction", "FLOPs",
                   "fp32", "bf16", "int8", "int4", "671.03B"):  # fmt: skip
        assert needle in out


def test_info_compares_models_side_by_side(capsys, tmp_path, monkeypatch):
    dense = ModelConfig.from_dict({**get_preset("demo").to_dict(), "moe": None})
    (tmp_path / "dense").mkdir()
    dense.save(tmp_path / "dense" / "config.json")
    assert main(["info", "demo", str(tmp_path / "dense"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    moe, plain = out["models"]
    assert moe["name"] == "demo" and plain["name"] == str(tmp_path / "dense")
    assert plain["total_params"] == count_params(dense).total < moe["total_params"]
    assert out["ratios"]["total_params"] == [1.0, plain["total_params"] / moe["total_params"]]
    assert out["ratios"]["kv_cache_bytes_per_1k_tokens_bf16"] == [1.0, 1.0]  # same attention
    monkeypatch.chdir(tmp_path)
    assert main(["info", "demo", "dense"]) == 0
    table = capsys.readouterr().out
    assert "side by side" in table and "KV cache / 1k tokens (bf16)" in table
    assert "dense" in table


def test_info_list():
    assert all(name in run("info", "--list").stdout for name in ("debug", "olmoe-1b-7b"))
    listed = json.loads(run("info", "--list", "--json").stdout)
    assert [row["name"] for row in listed] == list(PRESETS)


def test_info_reads_a_model_directory(tmp_path):
    cfg = get_preset("tiny")
    cfg.save(tmp_path / "config.json")
    data = json.loads(run("info", str(tmp_path), "--json").stdout)
    assert data["total_params"] == count_params(cfg).total


def test_info_errors_are_clear(tmp_path):
    proc = run("info", "no-such-model", check=False)
    assert proc.returncode == 2
    assert "neither a preset nor an existing model directory" in proc.stderr
    (tmp_path / "config.json").write_text('{"vocab_size": 10, "dim": 8, "num_layers": 1, '
                                          '"num_heads": 3}')  # fmt: skip
    proc = run("info", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "num_heads=3 is invalid" in proc.stderr


@pytest.mark.slow
def test_bench_layer_json_rows():
    proc = run("bench", "layer", "--json", "--dim", "64", "--prefill-tokens", "64",
               "--repeats", "1")  # fmt: skip
    rows = json.loads(proc.stdout)
    assert len(rows) == 8
    assert {(r["shape"], r["phase"], r["pass"]) for r in rows} == {
        (s, ph, pa) for s in ("coarse", "fine") for ph in ("prefill", "decode")
        for pa in ("fwd", "fwd_bwd")
    }  # fmt: skip
    for r in rows:
        assert r["ours_s"] > 0 and r["dense_s"] > 0
        assert r["hf_best_s"] is None or r["hf_best_s"] > 0
        # Same weights, same routing: our output equals transformers' Mixtral block.
        if r["max_abs_diff_hf"] is not None:
            assert r["max_abs_diff_hf"] < 1e-5


def test_bench_layer_rejects_unknown_shapes():
    proc = run("bench", "layer", "--shapes", "huge", check=False)
    assert proc.returncode == 2 and "unknown shape" in proc.stderr


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


def test_info_prefers_a_model_directory_over_a_preset_name(tmp_path, monkeypatch, capsys):
    cfg = ModelConfig.from_dict({**get_preset("tiny").to_dict(), "dim": 32, "num_heads": 4,
                                 "num_kv_heads": 4})  # fmt: skip
    (tmp_path / "tiny").mkdir()
    cfg.save(tmp_path / "tiny" / "config.json")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == count_params(cfg).total
