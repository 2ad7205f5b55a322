"""The weight tables: every tensor of a model has exactly one place, the conversions are
exact inverses, and the checkpoint and in-memory layouts agree."""

import pytest
import torch

from moekit import build_model
from moekit.interop.fields import UnsupportedError
from moekit.interop.hf import ARCHITECTURES
from moekit.interop.tensors import (
    DECODER,
    GQA,
    LAYER,
    Fused,
    PerExpert,
    bind,
    model_shapes,
    per_expert,
    stacked_experts,
)

from ._configs import VARIANTS, hf_config

ARCHS = {a.name: a for a in ARCHITECTURES}


def setup(variant):
    hf = hf_config(variant)
    arch = ARCHS[VARIANTS[variant][0]]
    cfg = arch.config_from_hf(hf)
    model = build_model(cfg, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, t in state.items():  # buffers such as the selection bias start at zero
        if t.abs().sum() == 0:
            state[name] = torch.randn_like(t)
    return arch, cfg, hf, state


def convert(maps, state):
    """The Hugging Face tensors of moekit `state` by `maps`."""
    out = {}
    for m in maps:
        out.update(zip(m.theirs, m.to_theirs([state[k] for k in m.ours]), strict=True))
    return out


@pytest.mark.parametrize("live", [False, True], ids=["checkpoint", "in-memory"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_tensor_has_one_place_and_comes_back_exactly(variant, live):
    arch, cfg, hf, state = setup(variant)
    maps = arch.tensor_maps(cfg, hf, live=live)
    ours = [k for m in maps for k in m.ours]
    theirs = [k for m in maps for k in m.theirs]
    assert sorted(ours) == sorted(state)
    assert len(set(theirs)) == len(theirs)
    assert all(name.startswith(("model.", "lm_head.")) for name in theirs)
    hf_state = convert(maps, state)
    for m in maps:
        back = m.to_ours([hf_state[k] for k in m.theirs])
        for name, tensor, shape in zip(m.ours, back, m.shapes, strict=True):
            assert tensor.shape == shape
            assert torch.equal(tensor, state[name]), name


# gpt-oss's and Llama 4's checkpoints store the experts as transformers holds them (tested below).
STACKED_IN_MEMORY = [
    a.name
    for a in ARCHITECTURES
    if a.weights is not a.live_weights and a.name != "GptOssForCausalLM"
]


@pytest.mark.parametrize("name", STACKED_IN_MEMORY)
def test_the_in_memory_layout_is_the_checkpoint_with_experts_stacked_and_fused(name):
    arch, cfg, hf, state = setup(name)
    checkpoint = convert(arch.tensor_maps(cfg, hf), state)
    live = convert(arch.tensor_maps(cfg, hf, live=True), state)
    layer = cfg.moe_layers[0]
    experts = f"model.layers.{layer}.mlp.experts"
    E = cfg.moe.num_experts
    # Mixtral's checkpoints call the (gate, up, down) projections w1, w3, w2.
    mixtral = name == "MixtralForCausalLM"
    projections = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    gate, up, down = [_stack_experts(checkpoint, layer, proj) for proj in projections]
    assert gate.shape[0] == up.shape[0] == down.shape[0] == E
    assert torch.equal(live[f"{experts}.gate_up_proj"], torch.cat([gate, up], dim=1))
    assert torch.equal(live[f"{experts}.down_proj"], down)
    # Everything else has the same name and value in both (Mixtral's router moves to `mlp`).
    same = {k for k in checkpoint if ".experts." not in k and "block_sparse_moe" not in k}
    assert same <= set(live)
    assert all(torch.equal(checkpoint[k], live[k]) for k in same)


@pytest.mark.parametrize("variant", ["GptOssForCausalLM", "gpt-oss-biases-untied"])
def test_gpt_oss_interleaves_gate_and_up_and_transposes_the_experts(variant):
    arch, cfg, hf, state = setup(variant)
    checkpoint = convert(arch.tensor_maps(cfg, hf), state)
    live = convert(arch.tensor_maps(cfg, hf, live=True), state)
    assert checkpoint.keys() == live.keys()
    assert all(torch.equal(checkpoint[k], live[k]) for k in checkpoint)
    ours, theirs = "layers.1.ffn.experts", "model.layers.1.mlp.experts"
    gate_up, bias = checkpoint[f"{theirs}.gate_up_proj"], checkpoint[f"{theirs}.gate_up_proj_bias"]
    E, F, D = state[f"{ours}.w_gate"].shape
    assert gate_up.shape == (E, D, 2 * F) and bias.shape == (E, 2 * F)
    assert torch.equal(gate_up[..., 0::2], state[f"{ours}.w_gate"].transpose(1, 2))
    assert torch.equal(gate_up[..., 1::2], state[f"{ours}.w_up"].transpose(1, 2))
    assert torch.equal(bias[:, 0::2], state[f"{ours}.b_gate"])
    assert torch.equal(bias[:, 1::2], state[f"{ours}.b_up"])
    assert torch.equal(checkpoint[f"{theirs}.down_proj"], state[f"{ours}.w_down"].transpose(1, 2))
    assert torch.equal(checkpoint[f"{theirs}.down_proj_bias"], state[f"{ours}.b_down"])
    assert torch.equal(checkpoint["model.layers.0.self_attn.sinks"], state["layers.0.attn.sinks"])


def test_llama4_stores_experts_input_major_and_heads_in_rope_pairs():
    arch, cfg, hf, state = setup("Llama4ForCausalLM")
    checkpoint = convert(arch.tensor_maps(cfg, hf), state)
    assert checkpoint.keys() == convert(arch.tensor_maps(cfg, hf, live=True), state).keys()
    layer = cfg.moe_layers[0]
    ours, theirs = f"layers.{layer}.ffn.experts", f"model.layers.{layer}.feed_forward.experts"
    F = cfg.moe.expert_hidden
    gate_up = checkpoint[f"{theirs}.gate_up_proj"]  # (E, D, 2F): gate then up
    assert gate_up.shape == (cfg.moe.num_experts, cfg.dim, 2 * F)
    assert torch.equal(gate_up[..., :F], state[f"{ours}.w_gate"].transpose(1, 2))
    assert torch.equal(gate_up[..., F:], state[f"{ours}.w_up"].transpose(1, 2))
    assert torch.equal(checkpoint[f"{theirs}.down_proj"], state[f"{ours}.w_down"].transpose(1, 2))
    # Each head's rows: moekit's first half are the checkpoint's even rows (the pairs' first).
    hd = cfg.head_dim
    q = checkpoint["model.layers.0.self_attn.q_proj.weight"].view(-1, hd, cfg.dim)
    ours_q = state["layers.0.attn.wq.weight"].view(-1, hd, cfg.dim)
    assert torch.equal(ours_q[:, : hd // 2], q[:, 0::2])
    assert torch.equal(ours_q[:, hd // 2 :], q[:, 1::2])


def _stack_experts(checkpoint, layer, proj):
    """The per-expert `proj` weights of `layer` in a checkpoint, stacked in expert order."""
    prefix = f"model.layers.{layer}."
    names = [k for k in checkpoint if k.startswith(prefix) and ".experts." in k and k.endswith(f".{proj}.weight")]  # fmt: skip
    return torch.stack([checkpoint[k] for k in sorted(names, key=_expert_index)])


def _expert_index(name):
    parts = name.split(".")
    return int(parts[parts.index("experts") + 1])


def test_deepseek_reorders_rope_rows_only_in_the_interleaved_layout():
    arch, cfg, hf, state = setup("DeepseekV3ForCausalLM")
    key = "model.layers.0.self_attn.q_b_proj.weight"
    interleaved = convert(arch.tensor_maps(cfg, hf), state)[key]
    halves = convert(arch.tensor_maps(cfg, {**hf, "rope_interleave": False}), state)[key]
    ours = state["layers.0.attn.wq_b.weight"]
    assert torch.equal(halves, ours)
    assert not torch.equal(interleaved, ours)
    a = cfg.attention
    period = a.qk_nope_head_dim + a.qk_rope_head_dim
    nope = ours.view(cfg.num_heads, period, -1)[:, : a.qk_nope_head_dim]
    assert torch.equal(interleaved.view(cfg.num_heads, period, -1)[:, : a.qk_nope_head_dim], nope)
    # The rotated rows come out evens first: row 1 of the head's RoPE part is its row 2.
    rope = ours.view(cfg.num_heads, period, -1)[:, a.qk_nope_head_dim :]
    theirs = interleaved.view(cfg.num_heads, period, -1)[:, a.qk_nope_head_dim :]
    assert torch.equal(theirs[:, 0::2], rope[:, : a.qk_rope_head_dim // 2])


# ---- the machinery, on small tables ----------------------------------------------------------


def small_config():
    return ARCHS["MixtralForCausalLM"].config_from_hf(hf_config("MixtralForCausalLM"))


def test_a_tensor_without_a_place_is_named():
    table = {**DECODER, **GQA, **per_expert(f"{LAYER}.e.{{e}}")}  # no router
    with pytest.raises(UnsupportedError, match=r"Test has no place for layers\.0\.ffn\.router"):
        bind(table, small_config(), {}, "Test")


def test_a_tensor_mapped_twice_or_in_part_is_refused():
    cfg = small_config()
    base = {**DECODER, **GQA, "layers.{i}.ffn.router.weight": f"{LAYER}.gate.weight"}
    twice = {**base, **per_expert(f"{LAYER}.e.{{e}}"), **stacked_experts(f"{LAYER}.stacked")}
    with pytest.raises(ValueError, match=r"layers\.0\.ffn\.experts\.w_(gate|up|down) is mapped twice"):  # fmt: skip
        bind(twice, cfg, {}, "Test")
    part = {**base, ("layers.{i}.ffn.experts.w_gate", "layers.{i}.ffn.missing"): Fused("x", dim=1)}
    with pytest.raises(ValueError, match="the model has only some of"):
        bind(part, cfg, {}, "Test")


def test_per_expert_and_fused_specs():
    cfg = small_config()
    shapes = model_shapes(cfg)
    assert shapes["layers.0.ffn.experts.w_gate"] == (4, 24, 32)  # (E, F, D)
    table = {
        **DECODER,
        **GQA,
        "layers.{i}.ffn.router.weight": "r.{i}",
        ("layers.{i}.ffn.experts.w_gate", "layers.{i}.ffn.experts.w_up"): Fused("gu.{i}", dim=1),
        "layers.{i}.ffn.experts.w_down": PerExpert("d.{i}.{e}"),
    }
    maps = {m.ours[0]: m for m in bind(table, cfg, {}, "Test")}
    fused, down = maps["layers.1.ffn.experts.w_gate"], maps["layers.1.ffn.experts.w_down"]
    assert fused.ours == ("layers.1.ffn.experts.w_gate", "layers.1.ffn.experts.w_up")
    assert fused.theirs == ("gu.1",)
    assert down.theirs == ("d.1.0", "d.1.1", "d.1.2", "d.1.3")
    gate, up = torch.randn(4, 24, 32), torch.randn(4, 24, 32)
    (joined,) = fused.to_theirs([gate, up])
    assert joined.shape == (4, 48, 32)
    assert all(torch.equal(a, b) for a, b in zip(fused.to_ours([joined]), [gate, up], strict=True))
    w = torch.randn(4, 32, 24)
    assert [t.shape for t in down.to_theirs([w])] == [(32, 24)] * 4
    assert torch.equal(down.to_ours(down.to_theirs([w]))[0], w)


def test_llama4_multimodal_checkpoints_hold_the_text_model_under_language_model():
    arch, cfg, hf, state = setup("Llama4ForCausalLM")
    multimodal = ARCHS["Llama4ForConditionalGeneration"]
    plain = convert(arch.tensor_maps(cfg, hf), state)
    nested = convert(multimodal.tensor_maps(cfg, {"text_config": hf}), state)
    assert nested.keys() == {f"language_model.{k}" for k in plain}
    assert all(torch.equal(nested[f"language_model.{k}"], v) for k, v in plain.items())
    assert multimodal.ignore("vision_model.patch_embedding.linear.weight", cfg)
    assert not multimodal.ignore("language_model.model.norm.weight", cfg)
