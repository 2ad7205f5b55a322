import json
import math

import pytest

from moekit.config import (
    FORMAT_VERSION,
    AttentionConfig,
    ModelConfig,
    MoEConfig,
    RopeScalingConfig,
)
from moekit.presets import PRESETS, get_preset, list_presets


def moe(**kw):
    base = dict(num_experts=8, top_k=2, expert_hidden=32)
    return MoEConfig(**{**base, **kw})


def model(**kw):
    base = dict(vocab_size=100, dim=64, num_layers=2, num_heads=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: moe(top_k=9), r"MoEConfig\.top_k=9 is invalid: must be <= num_experts \(8\)"),
        (lambda: moe(num_experts=-1), r"MoEConfig\.num_experts=-1 is invalid: must be a positive"),
        (lambda: moe(expert_hidden=0), r"MoEConfig\.expert_hidden=0 is invalid"),
        (lambda: moe(router="hash"), r"MoEConfig\.router='hash' is invalid: must be one of 'topk'"),
        (lambda: moe(score_func="relu"), r"MoEConfig\.score_func='relu' is invalid"),
        (lambda: moe(router="switch"), r"MoEConfig\.top_k=2 is invalid: must be 1 with router='switch'"),
        (lambda: moe(router="expert_choice"), r"needs a capacity factor"),
        (lambda: moe(num_groups=3), r"MoEConfig\.num_groups=3 is invalid: must divide num_experts"),
        (lambda: moe(num_groups=4, topk_groups=5), r"topk_groups=5 is invalid: must be <= num_groups"),
        (lambda: moe(num_groups=4, topk_groups=1, top_k=3), r"hold 2 experts, fewer than top_k=3"),
        (lambda: moe(aux_loss_weight=-0.1), r"aux_loss_weight=-0.1 is invalid: must be >= 0"),
        (lambda: moe(capacity_factor=0), r"capacity_factor=0 is invalid"),
        (lambda: moe(router_jitter=1.5), r"router_jitter=1.5 is invalid: must be in \[0, 1\)"),
        (lambda: moe(shared_expert_gate=True), r"needs num_shared_experts >= 1"),
        (lambda: moe(expert_choice_causal=True), r"only used with router='expert_choice'"),
        (lambda: moe(router="expert_choice", capacity_factor=2.0, score_func="sigmoid"), r"score_func='sigmoid' is invalid: must be 'softmax' with router='expert_choice'"),
        (lambda: moe(router="expert_choice", capacity_factor=2.0, routed_scaling_factor=2.5), r"routed_scaling_factor=2.5 is invalid"),
        (lambda: moe(capacity_priority="random"), r"capacity_priority='random' is invalid"),
        (lambda: moe(num_experts=8.0), r"MoEConfig\.num_experts=8\.0 is invalid: must be an integer"),
        (lambda: moe(norm_topk_prob="yes"), r"norm_topk_prob='yes' is invalid: must be true or false"),
        (lambda: model(dim=64.0), r"ModelConfig\.dim=64\.0 is invalid: must be an integer"),
        (lambda: model(num_heads=5), r"ModelConfig\.num_heads=5 is invalid: must divide dim \(64\)"),
        (lambda: model(num_kv_heads=3), r"ModelConfig\.num_kv_heads=3 is invalid: must divide num_heads \(4\)"),
        (lambda: model(dim=-8), r"ModelConfig\.dim=-8 is invalid: must be a positive"),
        (lambda: model(vocab_size=0), r"ModelConfig\.vocab_size=0 is invalid"),
        (lambda: model(activation="relu"), r"ModelConfig\.activation='relu' is invalid"),
        (lambda: model(dim=48, num_heads=16), r"odd head dim 3"),
        (lambda: AttentionConfig(kind="sparse"), r"AttentionConfig\.kind='sparse' is invalid"),
        (lambda: AttentionConfig(kind="mla"), r"AttentionConfig\.kv_lora_rank=0 is invalid"),
        (lambda: AttentionConfig(kv_lora_rank=16), r"kv_lora_rank=16 is invalid: is only used with kind='mla'"),
        (lambda: yarn(kind="dynamic"), r"RopeScalingConfig\.kind='dynamic' is invalid: must be one of 'yarn', 'linear', 'llama3'"),
        (lambda: yarn(kind="linear"), r"original_max_seq_len=64 is invalid: is not used with kind='linear'"),
        (lambda: yarn(low_freq_factor=1.0), r"low_freq_factor=1\.0 is invalid: is not used with kind='yarn'"),
        (lambda: yarn(kind="llama3", high_freq_factor=4.0), r"low_freq_factor=None is invalid: is needed by kind='llama3'"),
        (lambda: yarn(kind="llama3", low_freq_factor=4.0, high_freq_factor=2.0), r"high_freq_factor=2\.0 is invalid: must be >= low_freq_factor"),
        (lambda: yarn(original_max_seq_len=None), r"original_max_seq_len=None is invalid: is needed by kind='yarn'"),
        (lambda: yarn(factor=0.5), r"RopeScalingConfig\.factor=0\.5 is invalid: must be >= 1"),
        (lambda: yarn(original_max_seq_len=0), r"original_max_seq_len=0 is invalid"),
        (lambda: yarn(beta_fast=0.5), r"beta_fast=0\.5 is invalid: must be >= beta_slow \(1\.0\)"),
        (lambda: yarn(mscale=-1.0), r"RopeScalingConfig\.mscale=-1\.0 is invalid: must be >= 0"),
        (lambda: yarn(attention_factor=0.0), r"attention_factor=0\.0 is invalid"),
        (lambda: yarn(truncate="no"), r"truncate='no' is invalid: must be true or false"),
        (lambda: model(rope_scaling=dict(factor=4.0)), r"original_max_seq_len=None is invalid: is needed by kind='yarn'"),
        (lambda: model(rope_scaling=dict(kind="linear")), r"RopeScalingConfig: missing required field\(s\) factor"),
        (lambda: model(rope_scaling="yarn"), r"ModelConfig\.rope_scaling='yarn' is invalid"),
    ],
)  # fmt: skip
def test_validation_names_field_value_and_rule(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def yarn(**kw):
    return RopeScalingConfig(**{"factor": 4.0, "original_max_seq_len": 64, **kw})


def test_rope_scaling_factors_and_json():
    """YaRN's magnitude correction m(s) = 0.1 s ln(factor) + 1 sets the cos/sin factor (m(1),
    or m(mscale) / m(mscale_all_dim)) and MLA's softmax factor (m(mscale_all_dim) squared); a
    config without scaling writes no rope_scaling field."""
    m = lambda s: 0.1 * s * math.log(40.0) + 1  # noqa: E731
    assert yarn(factor=40.0).cos_sin_factor() == pytest.approx(m(1))
    assert yarn(factor=40.0).softmax_factor() == 1.0
    both = yarn(factor=40.0, mscale=1.0, mscale_all_dim=0.707)
    assert both.cos_sin_factor() == pytest.approx(m(1.0) / m(0.707))
    assert both.softmax_factor() == pytest.approx(m(0.707) ** 2)
    assert yarn(attention_factor=0.5, mscale=1.0, mscale_all_dim=2.0).cos_sin_factor() == 0.5
    assert yarn(factor=1.0).cos_sin_factor() == 1.0
    cfg = model(rope_scaling=dict(factor=40.0, original_max_seq_len=16, mscale=1.0))
    assert isinstance(cfg.rope_scaling, RopeScalingConfig)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert "rope_scaling" not in json.loads(model().to_json())


def test_bool_is_not_a_size():
    with pytest.raises(ValueError, match="num_layers=True"):
        model(num_layers=True)


@pytest.mark.parametrize("name", list_presets())
def test_json_round_trip(name):
    cfg = get_preset(name)
    text = cfg.to_json()
    data = json.loads(text)
    assert data["format_version"] == FORMAT_VERSION
    assert "moekit_version" in data
    assert ModelConfig.from_json(text) == cfg


def test_save_and_load(tmp_path):
    cfg = get_preset("tiny")
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == cfg
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_unknown_fields_and_versions_are_rejected():
    data = get_preset("debug").to_dict()
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**data, "hidden_size": 3})
    data["moe"]["n_experts"] = 4
    with pytest.raises(ValueError, match=r"MoEConfig: unknown field\(s\) n_experts"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="format_version=99"):
        ModelConfig.from_dict({**get_preset("debug").to_dict(), "format_version": 99})
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{not json")


def test_load_reports_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 10}')
    with pytest.raises((TypeError, ValueError), match=r"config\.json"):
        ModelConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.load(tmp_path / "missing")


def test_defaults_are_derived():
    cfg = model()
    assert cfg.num_kv_heads == 4
    assert cfg.head_dim == 16
    assert cfg.ffn_hidden == 256  # 8/3 * 64 rounded up to a multiple of 256


def test_moe_layer_placement():
    # Llama 4 Maverick: MoE on every other layer, starting with layer 1.
    maverick = get_preset("llama4-maverick")
    assert maverick.moe_layers == list(range(1, 48, 2))
    # DeepSeek-V3: 3 dense layers, then MoE everywhere.
    assert get_preset("deepseek-v3").moe_layers == list(range(3, 61))
    assert model(moe=moe(first_dense_layers=1, layer_step=1), num_layers=3).moe_layers == [1, 2]
    assert model(moe=None).moe_layers == []
    # Any set of dense layers, listed.
    middle = model(moe=moe(dense_layers=[1, 3]), num_layers=5)
    assert middle.moe_layers == [0, 2, 4] and middle.dense_layer_indices == [1, 3]
    assert middle.leading_dense_layers is None
    assert model(moe=moe(dense_layers=[1, 0]), num_layers=3).leading_dense_layers == 2
    assert ModelConfig.from_json(middle.to_json()).moe_layers == [0, 2, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dense_layers=[1, 1]), "names a layer twice"),
        (dict(dense_layers=[-1]), r"must be a list of layer indices \(>= 0\)"),
        (dict(dense_layers=[True]), "must be a list of layer indices"),
        (
            dict(dense_layers=[1], first_dense_layers=1),
            "replaces first_dense_layers and layer_step",
        ),
        (dict(dense_layers=[1], layer_step=2), "replaces first_dense_layers and layer_step"),
    ],
)
def test_dense_layers_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moe(**kwargs)


def test_dense_layers_beyond_the_model_are_named():
    with pytest.raises(ValueError, match=r"moe.dense_layers=\[5\] is invalid: names layer"):
        model(moe=moe(dense_layers=[5]), num_layers=3)


def test_capacity():
    assert moe().capacity(100) is None
    assert moe(capacity_factor=1.0).capacity(100) == 25  # 100 tokens * 2 copies / 8 experts
    assert moe(capacity_factor=1.25).capacity(10) == 4  # ceil(1.25 * 20 / 8)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; available presets: debug"):
        get_preset("gpt5")
    assert set(PRESETS) >= {
        "debug", "tiny", "small", "mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b",
        "qwen3-235b-a22b", "deepseek-v3", "llama4-scout", "llama4-maverick", "olmoe-1b-7b",
    }  # fmt: skip
