"""`moekit info MODEL --speed --max-memory SIZE`: the budget's plan and the decode speed
predicted with the expert hit rate that budget gives under uniform routing."""

import json

import pytest

from moekit.cli import main
from moekit.config import ModelConfig
from moekit.infer.offload import plan_budget
from moekit.info import speed_info
from moekit.model import meta_model
from moekit.model_dir import ModelDir


def test_a_budget_lowers_the_predicted_speed_by_its_misses(tiny_model_dir, capsys):
    cfg = ModelDir(tiny_model_dir).config()
    plan = plan_budget(meta_model(cfg), 2**40)
    budget = plan.resident + 2 * sum(plan.expert.values())  # 2 of 8 experts per layer
    assert main(["info", str(tiny_model_dir), "--speed", "--max-memory", str(budget),
                 "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["budget"]["slots_per_layer"] == 2
    assert data["budget"]["resident_bytes"] == plan.resident
    assert data["expert_hit_rate"] == 0.25
    miss_bw = data["miss_bandwidth_bytes_per_s"]
    assert miss_bw > 0
    # The bytes of every step at memory speed, plus the missed experts' bytes read from the file.
    seconds = data["bytes_per_token"] / data["bandwidth_bytes_per_s"]
    seconds += 0.75 * data["by_part"]["routed_experts"] / miss_bw
    assert data["predicted_tokens_per_s"] == pytest.approx(1 / seconds)
    assert main(["info", str(tiny_model_dir), "--speed", "--max-memory", str(budget)]) == 0
    out = capsys.readouterr().out
    assert "2 of 8 experts per layer" in out and "expected expert hit rate" in out


def test_a_budget_that_holds_every_expert_predicts_the_loaded_speed(tiny_model_dir):
    cfg = ModelDir(tiny_model_dir).config()
    plan = plan_budget(meta_model(cfg), 2**40)
    full = speed_info(str(tiny_model_dir), cache_slots=plan.experts_per_layer)
    assert full.expert_hit_rate == 1.0 and full.miss_bandwidth is None
    assert full.tokens_per_s == pytest.approx(full.bandwidth / full.bytes.total)


def test_a_preset_is_planned_on_the_meta_device(capsys):
    assert main(["info", "demo", "--speed", "--max-memory", "20MiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 < data["expert_hit_rate"] < 1 and data["budget"]["max_memory"] == 20 * 2**20


def test_bad_budgets_are_refused_by_name(tiny_model_dir, tmp_path, capsys):
    assert main(["info", str(tiny_model_dir), "--speed", "--max-memory", "1B"]) != 0
    err = capsys.readouterr().err
    assert "too small" in err and "needs at least" in err
    assert main(["info", "demo", "--speed", "--max-memory", "6XB"]) != 0
    assert "GiB" in capsys.readouterr().err  # names the accepted forms
    dense = tmp_path / "dense.json"
    ModelConfig.from_dict(dict(vocab_size=64, dim=32, num_layers=1, num_heads=2, num_kv_heads=2,
                               ffn_hidden=64, max_seq_len=32)).save(dense)  # fmt: skip
    assert main(["info", str(dense), "--speed", "--max-memory", "6GiB"]) != 0
    assert "no MoE layers" in capsys.readouterr().err
