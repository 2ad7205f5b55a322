"""Quantised model directories: written by `quantize`, loaded by `load_model`, close to the
float model, and refused by name when they are malformed."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import build_model, quantize
from moekit.config import ModelConfig, QuantizationConfig
from moekit.model_dir import ModelDir, load_model, save_model
from moekit.quant.build import quantize_model
from moekit.quant.experts import QuantExperts
from moekit.quant.weight import QuantLinear

TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(TOKENS, causal_routing=True).logits


@pytest.mark.parametrize(("bits", "only"), [(8, "experts"), (4, "experts"), (4, "all")])
def test_a_quantised_directory_loads_into_quantised_modules(tiny_model_dir, tmp_path, bits, only):
    result = quantize(tiny_model_dir, tmp_path / "q", bits=bits, only=only)
    assert result.bytes_after < result.bytes_before
    cfg = ModelDir(tmp_path / "q").config()
    assert cfg.quantization == QuantizationConfig(bits=bits, parts=only)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    model = load_model(tmp_path / "q")
    layers = model.moe_layers()
    assert all(isinstance(layer.experts, QuantExperts) for layer in layers.values())
    assert isinstance(model.layers[0].attn.wq, QuantLinear) == (only == "all")
    # The router stays float32 whatever is quantised.
    assert all(layer.router.weight.dtype == torch.float32 for layer in layers.values())
    # Loading gives exactly the model quantised in memory.
    float_model = load_model(tiny_model_dir)
    in_memory = quantize_model(
        load_model(tiny_model_dir), QuantizationConfig(bits=bits, parts=only)
    )
    torch.testing.assert_close(logits(model), logits(in_memory), rtol=0, atol=0)
    # Close to the float model (loose: the error of the quantisation itself, see
    # docs/inference.md), and not identical to it.
    ref = logits(float_model)
    err = (logits(model) - ref).abs().max() / ref.abs().max()
    assert 0 < err < (0.01 if bits == 8 else 0.2)


def test_quantising_a_quantised_model_is_refused(tiny_model_dir, tmp_path):
    quantize(tiny_model_dir, tmp_path / "q", bits=8)
    with pytest.raises(ValueError, match=r"already quantised \(8-bit"):
        quantize(tmp_path / "q", tmp_path / "qq", bits=4)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(load_model(tmp_path / "q"), QuantizationConfig(bits=4))


def test_bad_settings_are_refused_by_name(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="bits=3 is not a supported bit width"):
        quantize(tiny_model_dir, tmp_path / "a", bits=3)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize(tiny_model_dir, tmp_path / "a", bits=4, group_size=48)
    with pytest.raises(ValueError, match="only='attention'"):
        quantize(tiny_model_dir, tmp_path / "a", bits=8, only="attention")
    with pytest.raises(ValueError, match="already holds a model"):
        quantize(tiny_model_dir, tiny_model_dir, bits=8)
    assert not (tmp_path / "a").exists()


def test_a_group_size_that_does_not_divide_a_weight_is_refused(tmp_path):
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, dim=64, num_layers=1, num_heads=2, max_seq_len=16,
             moe=dict(num_experts=2, top_k=1, expert_hidden=96))
    )  # fmt: skip
    save_model(build_model(cfg), cfg, tmp_path / "f")
    with pytest.raises(ValueError, match=r"group size 64 does not divide .* 96 .*w_down"):
        quantize(tmp_path / "f", tmp_path / "q", bits=4, group_size=64)
    quantize(tmp_path / "f", tmp_path / "q", bits=4, group_size=32)  # 32 divides 64 and 96


def test_a_missing_scale_tensor_is_refused_by_name(tiny_model_dir, tmp_path):
    quantize(tiny_model_dir, tmp_path / "q", bits=4)
    path = tmp_path / "q" / "model.safetensors"
    state = load_file(path)
    del state["layers.1.ffn.experts.w_up.scale"]
    save_file(state, path)
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.ffn\.experts\.w_up\.scale"):
        load_model(tmp_path / "q")


def test_an_unknown_bit_width_in_config_json_is_refused_by_name(tiny_model_dir, tmp_path):
    quantize(tiny_model_dir, tmp_path / "q", bits=4)
    path = tmp_path / "q" / "config.json"
    data = json.loads(path.read_text())
    data["quantization"]["bits"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config\.json.*bits=3.*must be 8 or 4"):
        load_model(tmp_path / "q")


def test_a_bfloat16_load_keeps_quantised_weights_packed(tiny_model_dir, tmp_path):
    quantize(tiny_model_dir, tmp_path / "q", bits=8)
    model = load_model(tmp_path / "q", dtype=torch.bfloat16)
    experts = model.moe_layers()[0].experts
    assert isinstance(experts, QuantExperts)
    assert experts.w_up.qweight.dtype == torch.int8
    assert logits(model).dtype == torch.bfloat16
