"""The config tables: every field round-trips, every unsupported setting is refused by name,
and every fixed property of an architecture keeps a model it lacks from being exported."""

import copy

import pytest

from moekit import build_model, get_preset
from moekit.config import ModelConfig
from moekit.interop.fields import (
    REQUIRED,
    Field,
    Fixed,
    SameAs,
    UnsupportedError,
    Without,
    check_table,
    ours_value,
)
from moekit.interop.hf import ARCHITECTURES, architecture_of, architectures, export_hf
from moekit.model_dir import save_model

from ._configs import HF

ARCHS = {a.name: a for a in ARCHITECTURES}


def fields_of(arch):
    return [e for e in arch.config if isinstance(e, Field) and e.imported]


@pytest.mark.parametrize("name", list(HF))
def test_every_field_lands_in_its_moekit_field_and_comes_back(name):
    arch, hf = ARCHS[name], HF[name]
    cfg = arch.config_from_hf(hf)
    written = arch.config_to_hf(cfg)
    for f in fields_of(arch):
        assert f.hf in hf, f"the test config of {name} leaves out {f.hf}"
        if f.default is not REQUIRED and not isinstance(f.default, SameAs):
            assert hf[f.hf] != f.default, f"the test config of {name} gives {f.hf} its default"
        expected = f.cast(hf[f.hf]) if f.cast else hf[f.hf]
        for path in f.ours_paths():
            assert ours_value(cfg, path) == expected, (f.hf, path)
        assert written[f.hf] == hf[f.hf], f.hf
    assert arch.config_from_hf(written) == cfg
    assert arch.problems(cfg) == []
    # Only the initialisation scale is written and not read (the weights come with a checkpoint).
    not_read = [e.hf for e in arch.config if isinstance(e, Field) and not e.imported]
    assert not_read == ["initializer_range"]


@pytest.mark.parametrize("name", list(HF))
def test_a_moekit_config_survives_the_round_trip(name):
    arch = ARCHS[name]
    cfg = arch.config_from_hf(HF[name])
    again = arch.config_from_hf(arch.config_to_hf(cfg))
    assert again.to_dict() == cfg.to_dict()


def test_other_spellings_and_defaults():
    hf = {k: v for k, v in HF["MixtralForCausalLM"].items() if k != "num_local_experts"}
    hf |= {"num_experts": 6, "num_key_value_heads": None, "head_dim": 8, "rms_norm_eps": None}
    hf["rope_scaling"] = {"rope_type": "default"}
    cfg = architecture_of(hf).config_from_hf(hf)
    assert cfg.moe.num_experts == 6  # transformers 4's spelling
    assert cfg.num_kv_heads == cfg.num_heads  # null: the default, the number of heads
    assert cfg.attention.head_dim is None  # hidden_size / heads: moekit's default
    assert cfg.norm_eps == 1e-6


def test_qwen_layer_placement():
    arch, hf = ARCHS["Qwen2MoeForCausalLM"], HF["Qwen2MoeForCausalLM"]
    cfg = arch.config_from_hf({**hf, "mlp_only_layers": [1, 0]})
    assert (cfg.moe.first_dense_layers, cfg.moe.layer_step) == (2, 1)
    cfg = arch.config_from_hf({**hf, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert (cfg.moe.first_dense_layers, cfg.moe.layer_step) == (0, 2)
    written = arch.config_to_hf(cfg)
    assert (written["mlp_only_layers"], written["decoder_sparse_step"]) == ([], 2)


REFUSED = [  # (architecture, changes to its config, the message naming the setting)
    ("MixtralForCausalLM", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     r"config\.json: rope_parameters\.rope_type='yarn' is not supported"),
    ("MixtralForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"config\.json: rope_scaling\.type='linear' is not supported"),
    ("MixtralForCausalLM", {"hidden_act": "gelu"},
     r"config\.json: hidden_act='gelu' is not supported: experts and MLPs are SwiGLU"),
    ("MixtralForCausalLM", {"sliding_window": 16},
     r"sliding_window=16 is not supported: it is narrower than max_position_embeddings=64"),
    ("Qwen2MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 16},
     r"sliding_window=16 is not supported"),
    ("Qwen2MoeForCausalLM", {"mlp_only_layers": [1]},
     r"mlp_only_layers=\[1\] is not supported: moekit places dense layers first"),
    ("Qwen2MoeForCausalLM", {"decoder_sparse_step": 2},
     r"decoder_sparse_step=2 is not supported: it cannot be combined with mlp_only_layers"),
    ("Qwen3MoeForCausalLM", {"attention_bias": True},
     r"attention_bias=True is not supported: it gives o_proj a bias too"),
    ("OlmoeForCausalLM", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("OlmoeForCausalLM", {"clip_qkv": 8.0}, r"clip_qkv=8\.0 is not supported"),
    ("DeepseekV3ForCausalLM", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("DeepseekV3ForCausalLM", {"rope_interleave": "yes"}, r"rope_interleave='yes'"),
    ("DeepseekV3ForCausalLM", {"num_key_value_heads": 2},
     r"num_key_value_heads=2 is not supported: it must equal num_attention_heads"),
    ("DeepseekV3ForCausalLM", {"moe_layer_freq": 2}, r"moe_layer_freq=2 is not supported"),
    ("DeepseekV3ForCausalLM", {"topk_method": "greedy"}, r"topk_method='greedy'"),
    ("MixtralForCausalLM", {"hidden_size": None}, r"config\.json has no 'hidden_size'"),
    ("MixtralForCausalLM", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     r"architectures=\['GPT2LMHeadModel'\] \(model_type='gpt2'\) is not supported; moekit "
     r"converts MixtralForCausalLM"),
]  # fmt: skip


@pytest.mark.parametrize("name, changes, message", REFUSED)
def test_unsupported_settings_are_refused_by_name(name, changes, message):
    hf = {**HF[name], **changes}
    with pytest.raises(UnsupportedError, match=message):
        architecture_of(hf).config_from_hf(hf)


def test_a_window_as_wide_as_the_context_is_full_attention():
    for name, window in [("MixtralForCausalLM", {}), ("Qwen3MoeForCausalLM", {"use_sliding_window": True})]:  # fmt: skip
        hf = {**HF[name], **window, "sliding_window": 64}
        assert ARCHS[name].config_from_hf(hf) == ARCHS[name].config_from_hf(HF[name])


def fixed_entries():
    return [
        pytest.param(arch, entry, id=f"{arch.name}-{'-'.join(entry.values)}")
        for arch in ARCHITECTURES
        for entry in arch.config
        if isinstance(entry, Fixed)
    ]


# Two values of each field a Fixed entry names: the one the model does not have is enough to
# refuse an export.
OTHER_VALUES = {
    "moe.router": ("expert_choice", "topk"), "moe.score_func": ("sigmoid", "softmax"),
    "moe.norm_topk_prob": (False, True), "moe.num_shared_experts": (2, 0),
    "moe.first_dense_layers": (1, 0), "moe.layer_step": (2, 1), "moe.capacity_factor": (1.5, None),
    "moe.num_groups": (2, 1), "moe.routed_scaling_factor": (2.0, 1.0),
    "moe.selection_bias": (True, False), "moe.bias_update_rate": (0.001, 0.0),
    "moe.shared_expert_gate": (True, False), "attention.kind": ("mla", "gqa"),
    "attention.qk_norm": ("full", "none"), "attention.qkv_bias": (True, False),
    "activation": ("gelu", "swiglu"), "moe.router_bias": (False, True),
    "moe.expert_bias": (False, True), "attention.sinks": (False, True),
}  # fmt: skip


@pytest.mark.parametrize("arch, entry", fixed_entries())
def test_each_fixed_property_refuses_a_model_without_it(arch, entry):
    cfg = arch.config_from_hf(HF[arch.name])
    assert entry.why not in arch.problems(cfg)
    for path in entry.values:
        other = next(v for v in OTHER_VALUES[path] if v != ours_value(cfg, path))
        assert entry.why in arch.problems(_with(cfg, path, other)), path


# Each option of a `Without` entry turned on (gpt-oss's options, on the other architectures).
TURNED_ON = {
    "activation": "clamped_swiglu", "moe.expert_bias": True, "moe.router_bias": True,
    "attention.o_bias": True, "attention.sinks": True, "attention.sliding_window": 8,
    "attention.sliding_layers": [0],
}  # fmt: skip


@pytest.mark.parametrize(
    "arch", [a for a in ARCHITECTURES if any(isinstance(e, Without) for e in a.config)],
    ids=lambda a: a.name,
)  # fmt: skip
def test_options_an_architecture_lacks_are_refused_one_by_one(arch):
    cfg = arch.config_from_hf(HF[arch.name])
    (entry,) = [e for e in arch.config if isinstance(e, Without)]
    assert set(entry.values) == set(TURNED_ON)
    for path, value in TURNED_ON.items():
        problems = arch.problems(_with(cfg, path, value))
        assert any(path in p and p.startswith(f"{arch.label} has no") for p in problems), path
    assert "GptOssForCausalLM" not in [
        a.name for a in ARCHITECTURES if a.problems(cfg) == []
    ]  # the plainest architecture first: gpt-oss is never chosen for a plain model


def _with(cfg, path, value):
    """A copy of `cfg` with the field at `path` set to `value`, unvalidated: the table judges
    values one by one."""
    changed = copy.deepcopy(cfg)
    *parents, leaf = path.split(".")
    owner = changed
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, leaf, value)
    return changed


def test_a_dense_model_has_no_moe_architecture():
    cfg = ModelConfig(vocab_size=64, dim=32, num_layers=1, num_heads=4)
    for arch in ARCHITECTURES:
        assert arch.problems(cfg)[-1] == "it is dense"
    assert "DeepSeek-V3 uses multi-head latent attention" in architectures()[
        "DeepseekV3ForCausalLM"
    ].problems(cfg)


def test_a_field_with_two_rules_is_refused():
    table = (Field("hidden_size", "dim"), Fixed({"dim": 32}, "always 32"))
    with pytest.raises(ValueError, match="dim has two rules"):
        check_table(table, "Test")
    with pytest.raises(ValueError, match="hidden_size has two rules"):
        check_table((Field("hidden_size", "dim"), Field("hidden_size", "num_layers")), "Test")


# ---- export's choice (moved from the parity tests: they need no transformers) ---------------


def test_export_refuses_qkv_biases_without_an_output_bias(tmp_path):
    """A moekit model with q/k norms and q/k/v biases has no exact Hugging Face form: Qwen3-MoE's
    attention_bias would add an o_proj bias the model does not have."""
    cfg = ModelConfig.from_dict(dict(
        vocab_size=64, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=32,
        attention=dict(qk_norm="head", qkv_bias=True),
        moe=dict(num_experts=4, top_k=2, expert_hidden=16),
    ))  # fmt: skip
    save_model(build_model(cfg), cfg, tmp_path / "ours")
    with pytest.raises(
        UnsupportedError, match=r"Qwen3MoeForCausalLM: .*attention_bias would give o_proj a bias"
    ):
        export_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()


def test_export_chooses_the_plainest_architecture_or_explains(tmp_path):
    cfg = get_preset("debug")  # softmax top-k, no shared experts: Mixtral
    save_model(build_model(cfg), cfg, tmp_path / "debug")
    assert export_hf(tmp_path / "debug", tmp_path / "debug-hf") == "MixtralForCausalLM"
    cfg = get_preset("tiny")  # a shared expert without a gate, softmax routing: nothing fits
    save_model(build_model(cfg), cfg, tmp_path / "tiny")
    with pytest.raises(
        UnsupportedError,
        match=r"no Hugging Face architecture represents this model exactly(.|\n)*Qwen2MoeForCausalLM: .*one shared expert with a sigmoid gate",
    ):
        export_hf(tmp_path / "tiny", tmp_path / "tiny-hf")
