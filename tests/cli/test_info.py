"""`moekit info`: figures of presets and model directories, side by side, and the preset list."""

import json
import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.config import ModelConfig
from moekit.params import count_params
from moekit.presets import PRESETS, get_preset

from .conftest import run


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
                   "fp32", "bf16", "int8", "int4", "671.03B", "latent KV cache"):  # fmt: skip
        assert needle in out


def test_info_shows_the_rope_scaling():
    out = run("info", "deepseek-v2-lite").stdout
    assert "10000, YaRN x40 from 4096 positions" in out
    data = json.loads(run("info", "deepseek-v3", "--json").stdout)
    assert data["rope_theta"] == 10000.0
    assert data["rope_scaling"]["factor"] == 40.0
    assert data["rope_scaling"]["original_max_seq_len"] == 4096
    assert json.loads(run("info", "debug", "--json").stdout)["rope_scaling"] is None


def test_info_shows_interleaved_rope_and_nope_layers():
    out = run("info", "llama4-scout").stdout
    assert "NoPE layers 3, 7, 11" in " ".join(out.split())  # the table may wrap the cell
    data = json.loads(run("info", "llama4-maverick", "--json").stdout)
    assert data["irope"]["chunk_size"] == 8192 and len(data["irope"]["nope_layers"]) == 12
    assert json.loads(run("info", "debug", "--json").stdout)["irope"] is None


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
    assert listed[0]["total_params"] == count_params(get_preset(listed[0]["name"])).total


def test_info_and_help_do_not_import_torch():
    # The light commands answer at once: none of them pays for importing torch.
    code = (
        "import sys, contextlib, io\n"
        "from moekit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['info', '--list', '--json']) == 0\n"
        "    assert main(['info', 'mixtral-8x7b', 'demo']) == 0\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
    assert main(["info"]) == 2


def test_info_prefers_a_model_directory_over_a_preset_name(tmp_path, monkeypatch, capsys):
    cfg = ModelConfig.from_dict({**get_preset("tiny").to_dict(), "dim": 32, "num_heads": 4,
                                 "num_kv_heads": 4})  # fmt: skip
    (tmp_path / "tiny").mkdir()
    cfg.save(tmp_path / "tiny" / "config.json")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == count_params(cfg).total


def test_info_speed_predicts_from_bytes_and_measured_bandwidth(capsys):
    from moekit.speed import step_bytes

    assert main(["info", "demo", "--speed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bytes_per_token"] == step_bytes(get_preset("demo")).total
    assert data["predicted_tokens_per_s"] == pytest.approx(
        data["bandwidth_bytes_per_s"] / data["bytes_per_token"]
    )
    assert main(["info", "demo", "--speed"]) == 0
    assert "predicted decode tokens/s" in capsys.readouterr().out
    assert main(["info", "demo", "debug", "--speed"]) != 0
    assert "--speed takes one preset" in capsys.readouterr().err
