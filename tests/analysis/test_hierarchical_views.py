"""Hierarchical routing seen from the outside: analyze's load per group, doctor's dead group,
`moekit info`'s routing line, and the Hugging Face export that refuses it by name."""

import json
import shutil

import pytest
import torch

from moekit import build_model
from moekit.analysis.analyze import analyze
from moekit.analysis.doctor import diagnose
from moekit.analysis.result import Analysis
from moekit.config import ModelConfig
from moekit.interop.fields import UnsupportedError
from moekit.interop.hf import export_hf
from moekit.model import cast_model
from moekit.model_dir import save_model
from moekit.params import summary

HIER = dict(vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128,
            max_seq_len=128,
            moe=dict(num_experts=8, top_k=2, expert_hidden=64, router="hierarchical",
                     router_groups=4, group_top_k=2, group_bias_update_rate=0.001))  # fmt: skip


@pytest.fixture(scope="module")
def dead_group_dir(tmp_path_factory, tiny_model_dir):
    """A hierarchical model whose group 3 no token can choose (its selection bias is -10,
    below any probability)."""
    out = tmp_path_factory.mktemp("hier")
    shutil.copyfile(tiny_model_dir / "tokenizer.json", out / "tokenizer.json")
    cfg = ModelConfig.from_dict(HIER)
    model = build_model(cfg, seed=0)
    for layer in model.moe_layers().values():
        layer.router.group_selection_bias[3] = -10.0
    save_model(model, cfg, out)
    return out


def test_analyze_reports_the_load_per_group(tmp_path, dead_group_dir):
    result = analyze(dead_group_dir, tmp_path / "out", max_tokens=1024, seq_len=64, shuffles=1,
                     progress=False)  # fmt: skip
    for v in result.load.layers.values():
        assert v.groups is not None
        assert sum(v.groups.copies_per_group) == sum(v.tokens_per_expert)
        assert v.groups.copies_per_group == [sum(v.tokens_per_expert[g * 2 : g * 2 + 2])
                                             for g in range(4)]  # fmt: skip
        assert v.groups.dead == [3] and v.groups.copies_per_group[3] == 0
        assert v.groups.imbalance == pytest.approx(max(v.groups.copies_per_group) / (2048 / 4))
    assert Analysis.read(tmp_path / "out") == result
    html = (tmp_path / "out" / "report.html").read_text()
    assert "copies per group" in html and "dead groups" in html


def test_an_analysis_without_groups_still_reads(tmp_path, tiny_model_dir):
    result = analyze(tiny_model_dir, tmp_path / "out", max_tokens=512, seq_len=64, shuffles=1,
                     progress=False)  # fmt: skip
    assert all(v.groups is None for v in result.load.layers.values())
    path = tmp_path / "out" / "analysis.json"
    data = json.loads(path.read_text())
    for layer in data["load"]["layers"].values():
        del layer["groups"]  # as written before the field existed
    path.write_text(json.dumps(data))
    assert Analysis.read(tmp_path / "out") == result


def test_doctor_finds_a_dead_group_and_passes_a_live_one(tmp_path, dead_group_dir, tiny_model_dir):
    check = {c.name: c for c in diagnose(dead_group_dir, sample_tokens=512)}["dead_groups"]
    assert check.status == "problem"
    assert "layer 0: group(s) 3 got no token" in check.evidence
    assert "group_bias_update_rate" in check.advice
    assert check.data["layers"]["0"]["dead"] == [3]
    live = tmp_path / "live"
    shutil.copytree(dead_group_dir, live)
    cfg = ModelConfig.from_dict(HIER)
    save_model(build_model(cfg, seed=0), cfg, live)
    check = {c.name: c for c in diagnose(live, sample_tokens=512)}["dead_groups"]
    assert check.status == "ok" and "every one of the 4 expert groups" in check.evidence
    flat = {c.name: c for c in diagnose(tiny_model_dir, sample_tokens=512)}["dead_groups"]
    assert flat.status == "ok" and flat.data == {"applicable": False}


def test_info_names_the_routing_and_hf_export_refuses_it(tmp_path, dead_group_dir):
    cfg = ModelConfig.from_dict(HIER)
    s = summary(cfg)
    assert s.routing == "hierarchical: 2 of 4 groups x 1 of 2 experts"
    assert s.to_dict()["routing"] == s.routing
    assert "routing" not in summary(ModelConfig.from_dict({**HIER, "moe": dict(
        num_experts=8, top_k=2, expert_hidden=64)})).to_dict()  # fmt: skip
    with pytest.raises(
        UnsupportedError, match=r"no Hugging Face architecture.*moe.router='hierarchical'"
    ):
        export_hf(dead_group_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_group_router_weights_stay_float32_in_a_bf16_model():
    cfg = ModelConfig.from_dict(HIER)
    model = cast_model(build_model(cfg, seed=0), torch.bfloat16)
    router = model.moe_layers()[0].router
    assert router.group_weight.dtype == router.group_selection_bias.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16
    out = router(torch.randn(5, 64, dtype=torch.bfloat16))
    assert out.logits.dtype == out.weights.dtype == torch.float32


def test_doctor_finds_a_group_router_stored_in_bf16(tmp_path, dead_group_dir):
    from safetensors.torch import load_file, save_file

    live = tmp_path / "bf16"
    shutil.copytree(dead_group_dir, live)
    state = load_file(live / "model.safetensors")
    state["layers.1.ffn.router.group_weight"] = state["layers.1.ffn.router.group_weight"].bfloat16()
    save_file(state, live / "model.safetensors", metadata={"format": "pt"})
    check = {c.name: c for c in diagnose(live, sample_tokens=256)}["router_precision"]
    assert check.status == "problem"
    assert "layers.1.ffn.router.group_weight (BF16)" in check.evidence
