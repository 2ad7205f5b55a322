"""The config tables: every field round-trips, every unsupported setting is refused by name,
and every fixed property of an architecture keeps a model it lacks from being exported."""

import copy

import pytest

from moekit import build_model, get_preset
from moekit.config import ModelConfig, RopeScalingConfig
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


def test_yarn_in_both_spellings():
    """transformers 4 states YaRN in rope_scaling (with "type"), 5 in rope_parameters; when both
    are present rope_scaling wins, as in transformers. The pretrained context defaults to
    max_position_embeddings, and a top-level original_max_position_embeddings wins over the
    dict's. Export writes the same settings under both names."""
    arch, hf = ARCHS["Qwen3MoeForCausalLM"], HF["Qwen3MoeForCausalLM"]
    yarn = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "beta_fast": None}
    cfg = arch.config_from_hf({**hf, "rope_parameters": yarn})
    s = cfg.rope_scaling
    assert cfg.rope_theta == 5000.0 and s.kind == "yarn" and s.factor == 4.0
    assert (s.original_max_seq_len, s.beta_fast, s.beta_slow, s.truncate) == (64, 32.0, 1.0, True)
    old = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    both = {**hf, "rope_parameters": yarn, "rope_scaling": old, "rope_theta": 7.0}
    cfg = arch.config_from_hf(both)
    assert (cfg.rope_theta, cfg.rope_scaling.factor) == (7.0, 2.0)
    assert cfg.rope_scaling.original_max_seq_len == 16
    top = arch.config_from_hf({**both, "original_max_position_embeddings": 32})
    assert top.rope_scaling.original_max_seq_len == 32
    written = arch.config_to_hf(cfg)
    assert written["rope_scaling"] == {
        k: v for k, v in written["rope_parameters"].items() if k != "rope_theta"
    }
    assert written["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 7.0, "factor": 2.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": True,
    }  # fmt: skip
    assert "rope_scaling" not in arch.config_to_hf(arch.config_from_hf(hf))  # unscaled
    implied = arch.config_from_hf({**hf, "rope_parameters": {**yarn, "factor": None},
                                   "original_max_position_embeddings": 16})  # fmt: skip
    assert implied.rope_scaling.factor == 64 / 16  # max_position_embeddings / pretrained


def test_linear_and_llama3_scaling():
    arch, hf = ARCHS["MixtralForCausalLM"], HF["MixtralForCausalLM"]
    cfg = arch.config_from_hf({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_scaling.to_dict() == RopeScalingConfig(kind="linear", factor=2.0).to_dict()
    assert arch.config_to_hf(cfg)["rope_parameters"] == {
        "rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0,
    }  # fmt: skip
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    cfg = arch.config_from_hf({**hf, "rope_parameters": llama3})
    s = cfg.rope_scaling
    assert (s.kind, s.factor, s.original_max_seq_len) == ("llama3", 8.0, 16)
    assert (s.low_freq_factor, s.high_freq_factor) == (1.0, 4.0)
    assert arch.config_to_hf(cfg)["rope_parameters"] == {**llama3, "rope_theta": 500000.0}
    assert arch.config_from_hf(arch.config_to_hf(cfg)) == cfg


def test_deepseek_v2_routing_methods():
    arch, hf = ARCHS["DeepseekV2ForCausalLM"], HF["DeepseekV2ForCausalLM"]
    cfg = arch.config_from_hf(hf)
    moe = cfg.moe
    assert (moe.num_groups, moe.topk_groups, moe.group_score) == (4, 2, "max")
    assert (moe.score_func, moe.norm_topk_prob, moe.selection_bias) == ("softmax", False, False)
    greedy = arch.config_from_hf({**hf, "topk_method": "greedy"})  # the groups are not used
    assert (greedy.moe.num_groups, greedy.moe.topk_groups) == (1, 1)
    assert arch.config_to_hf(greedy)["topk_method"] == "greedy"
    assert arch.config_to_hf(cfg)["topk_method"] == "group_limited_greedy"
    assert "DeepSeek-V2 scores expert groups by their best expert (group_score='max')" in (
        arch.problems(_with(cfg, "moe.group_score", "top2_sum"))
    )
    # A sigmoid-routed model is DeepSeek-V3's, a softmax-routed MLA model DeepSeek-V2's.
    assert ARCHS["DeepseekV3ForCausalLM"].problems(cfg) != []
    assert arch.problems(ARCHS["DeepseekV3ForCausalLM"].config_from_hf(
        HF["DeepseekV3ForCausalLM"])) != []  # fmt: skip


def test_qwen_layer_placement():
    arch, hf = ARCHS["Qwen2MoeForCausalLM"], HF["Qwen2MoeForCausalLM"]
    cfg = arch.config_from_hf({**hf, "mlp_only_layers": [1, 0]})
    assert (cfg.moe.first_dense_layers, cfg.moe.layer_step) == (2, 1)
    cfg = arch.config_from_hf({**hf, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert (cfg.moe.first_dense_layers, cfg.moe.layer_step) == (0, 2)
    written = arch.config_to_hf(cfg)
    assert (written["mlp_only_layers"], written["decoder_sparse_step"]) == ([], 2)
    # Any set of dense layers: a dense layer in the middle, or a list beside a step.
    cfg = arch.config_from_hf({**hf, "num_hidden_layers": 4, "mlp_only_layers": [1]})
    assert cfg.moe.dense_layers == [1] and cfg.moe_layers == [0, 2, 3]
    written = arch.config_to_hf(cfg)
    assert (written["mlp_only_layers"], written["decoder_sparse_step"]) == ([1], 1)
    both = {**hf, "num_hidden_layers": 6, "mlp_only_layers": [3], "decoder_sparse_step": 2}
    cfg = arch.config_from_hf(both)
    assert cfg.moe_layers == [1, 5]  # Qwen: (i + 1) % step == 0 and i not listed
    assert arch.config_to_hf(cfg)["mlp_only_layers"] == [0, 2, 3, 4]
    # The shorthands are exported as the list when they are not a plain step.
    cfg = arch.config_from_hf({**hf, "mlp_only_layers": [0]})
    assert arch.config_to_hf(cfg)["mlp_only_layers"] == [0]


REFUSED = [  # (architecture, changes to its config, the message naming the setting)
    ("MixtralForCausalLM", {"rope_parameters": {"rope_type": "longrope", "factor": 8.0}},
     r"config\.json: rope_parameters\.rope_type='longrope' is not supported"),
    ("MixtralForCausalLM", {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     r"config\.json: rope_scaling\.type='dynamic' is not supported"),
    ("MixtralForCausalLM", {"rope_scaling": {"type": "linear"}},
     r"rope_scaling\.factor=None is not supported: linear scaling needs its factor"),
    ("MixtralForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0, "mscale": 1.0}},
     r"rope_scaling\.mscale=1\.0 is not supported: moekit's linear scaling does not carry it"),
    ("Qwen3MoeForCausalLM",
     {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}},
     r"rope_parameters\.partial_rotary_factor=0\.5 is not supported"),
    ("DeepseekV2ForCausalLM", {"topk_method": "noaux_tc"},
     r"topk_method='noaux_tc' is not supported: DeepSeek-V2 routes by 'greedy' or"),
    ("DeepseekV2ForCausalLM", {"n_group": None},
     r"n_group=None is not supported: group_limited_greedy needs it"),
    ("DeepseekV2ForCausalLM", {"norm_topk_prob": True}, r"norm_topk_prob=True is not supported"),
    ("DeepseekV2ForCausalLM", {"mlp_bias": True}, r"mlp_bias=True is not supported"),
    ("DeepseekV2ForCausalLM", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("DeepseekV2ForCausalLM", {"n_shared_experts": 0},
     r"n_shared_experts=0 is not supported: transformers' DeepSeek-V2 always has shared"),
    ("MixtralForCausalLM", {"hidden_act": "gelu"},
     r"config\.json: hidden_act='gelu' is not supported: experts and MLPs are SwiGLU"),
    ("MixtralForCausalLM", {"sliding_window": 16},
     r"sliding_window=16 is not supported: it is narrower than max_position_embeddings=64"),
    ("Qwen2MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 16},
     r"sliding_window=16 is not supported"),
    ("Qwen2MoeForCausalLM", {"mlp_only_layers": [7]},
     r"mlp_only_layers=\[7\] is not supported: it must list layer indices below"),
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
    ("Llama4ForCausalLM", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("Llama4ForCausalLM", {"no_rope_layers": [1, 0]},
     r"no_rope_layers=\[1, 0\] is not supported: it must hold a 1 \(RoPE\) or 0 \(NoPE\) for "
     r"each of the 4 layers"),
    ("Llama4ForCausalLM", {"layer_types": ["full_attention"] * 4},
     r"layer_types=.* is not supported: moekit chunks attention exactly on the RoPE layers"),
    ("Llama4ForCausalLM", {"moe_layers": [9]},
     r"moe_layers=\[9\] is not supported: it must list layer indices below 4"),
    ("Llama4ForCausalLM", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
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
    "moe.dense_layers": ([1], None),
    "moe.num_groups": (2, 1), "moe.routed_scaling_factor": (2.0, 1.0),
    "moe.selection_bias": (True, False), "moe.bias_update_rate": (0.001, 0.0),
    "moe.shared_expert_gate": (True, False), "attention.kind": ("mla", "gqa"),
    "attention.qk_norm": ("full", "none"), "attention.qkv_bias": (True, False),
    "activation": ("gelu", "swiglu"), "moe.router_bias": (False, True),
    "moe.expert_bias": (False, True), "attention.sinks": (False, True),
    "moe.scale_expert_input": (True, False),
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


@pytest.mark.parametrize("name", ["llama4-scout", "llama4-maverick"])
def test_llama4_presets_are_llama4_checkpoints(name):
    from moekit.interop.hf import choose_architecture
    from moekit.presets import get_preset

    cfg = get_preset(name)
    assert choose_architecture(cfg).name == "Llama4ForCausalLM"
    hf = architectures()["Llama4ForCausalLM"].config_to_hf(cfg)
    assert hf["no_rope_layers"][:4] == [1, 1, 1, 0] and hf["attention_chunk_size"] == 8192
    assert hf["interleave_moe_layer_step"] == (2 if name == "llama4-maverick" else 1)
    back = architectures()["Llama4ForCausalLM"].config_from_hf(hf)
    assert (back.irope, back.moe, back.rope_scaling) == (cfg.irope, cfg.moe, cfg.rope_scaling)
    assert back.head_dim == cfg.head_dim and back.dense_hidden == cfg.dense_hidden


def test_architectures_without_irope_refuse_it():
    cfg = ModelConfig.from_dict(
        {**architectures()["MixtralForCausalLM"].config_from_hf(HF["MixtralForCausalLM"])
         .to_dict(), "irope": {"nope_layers": [1], "chunk_size": 8}}
    )  # fmt: skip
    for arch in ARCHITECTURES:
        problems = arch.problems(cfg)
        if arch.name.startswith("Llama4"):
            assert not any("irope" in p for p in problems)
        else:
            assert (
                "it has no interleaved RoPE / NoPE layers or chunked attention (irope)" in problems
            )


def test_llama4_multimodal_config_is_read_from_its_text_config():
    text = {k: v for k, v in HF["Llama4ForCausalLM"].items() if k != "architectures"}
    hf = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
          "text_config": text, "vision_config": {"hidden_size": 32}}  # fmt: skip
    arch = architecture_of(hf)
    assert arch.name == "Llama4ForConditionalGeneration"
    causal = architectures()["Llama4ForCausalLM"]
    assert arch.config_from_hf(hf) == causal.config_from_hf(HF["Llama4ForCausalLM"])
    assert any("written as Llama4ForCausalLM" in p for p in arch.problems(arch.config_from_hf(hf)))
    with pytest.raises(UnsupportedError, match="text_config=None is not supported"):
        arch.config_from_hf({k: v for k, v in hf.items() if k != "text_config"})


def test_scouts_published_config_is_the_preset():
    """Llama 4 Scout's config.json (text_config as published, trimmed to what the text model
    reads, plus a field moekit does not know) imports as the llama4-scout preset."""
    text = {
        "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8192,
        "attention_dropout": 0.0, "bos_token_id": 200000, "eos_token_id": [200001, 200007],
        "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 5120, "initializer_range": 0.02, "interleave_moe_layer_step": 1,
        "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760, "no_rope_layers": [], "num_attention_heads": 40,
        "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
        "num_local_experts": 16, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "tie_word_embeddings": False, "use_qk_norm": True, "vocab_size": 202048,
        "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
    }  # fmt: skip
    hf = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
          "text_config": text}  # fmt: skip
    cfg = architecture_of(hf).config_from_hf(hf)
    preset = get_preset("llama4-scout")
    assert (cfg.irope, cfg.moe) == (preset.irope, preset.moe)
    assert cfg.rope_scaling == preset.rope_scaling and cfg.dense_hidden == preset.dense_hidden
    assert cfg.irope.nope_layers[:3] == [3, 7, 11]
