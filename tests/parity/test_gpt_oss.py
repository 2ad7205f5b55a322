"""gpt-oss beyond the shared checks of test_hf.py: MXFP4 expert weights dequantised on import
(against transformers' own dequantisation), settings refused by name, and a model built and
trained in moekit with gpt-oss's options exported to transformers."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from moekit import build_model  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.interop import mxfp4  # noqa: E402
from moekit.interop.hf import UnsupportedError, export_hf, import_hf  # noqa: E402
from moekit.model_dir import load_model, save_model  # noqa: E402

from .test_hf import VOCAB, make_hf, tokenizer  # noqa: E402, F401  (a fixture)


def _packed(shape, generator):
    """Random MXFP4 blocks and scales for a weight of `shape` (..., O, I): small exponents."""
    *lead, rows, cols = shape
    blocks = torch.randint(0, 256, (*lead, rows, cols // 32, 16), generator=generator)
    scales = torch.randint(127 - 7, 127 - 2, (*lead, rows, cols // 32), generator=generator)
    return blocks.to(torch.uint8), scales.to(torch.uint8)


def test_mxfp4_values_by_hand_and_against_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[..., 0] = 0x21  # low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[..., 1] = 0xF9  # low nibble 9 (-0.5), high nibble 15 (-6.0)
    scales = torch.full((1, 1, 1), 128, dtype=torch.uint8)  # x 2
    got = mxfp4.dequantize(blocks, scales)
    assert got.shape == (1, 1, 32)
    assert got[0, 0, :4].tolist() == [1.0, 2.0, -1.0, -12.0] and not got[0, 0, 4:].any()
    blocks, scales = _packed((3, 8, 64), torch.Generator().manual_seed(0))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (E, I, O)
    assert torch.equal(mxfp4.dequantize(blocks, scales), theirs.transpose(1, 2))
    with pytest.raises(UnsupportedError, match=r"up\.weight: MXFP4 blocks of shape"):
        mxfp4.dequantize(blocks, scales[..., :1], "up.weight")


def test_an_mxfp4_checkpoint_imports_dequantised(tmp_path, tokenizer):  # noqa: F811
    """transformers' own layout of an MXFP4 gpt-oss checkpoint: the experts' gate_up_proj and
    down_proj as _blocks/_scales and a quantization_config; the import computes what
    transformers computes with the same weights dequantised by its own function."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = make_hf("gpt_oss", tmp_path / "hf", tokenizer, config_kw=dict(intermediate_size=64))
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    E, D, F = 4, 64, 64
    for layer in range(3):
        experts = f"model.layers.{layer}.mlp.experts"
        for name, shape in (("gate_up_proj", (E, 2 * F, D)), ("down_proj", (E, D, F))):
            blocks, scales = _packed(shape, gen)
            del weights[f"{experts}.{name}"]
            weights[f"{experts}.{name}_blocks"], weights[f"{experts}.{name}_scales"] = (
                blocks,
                scales,
            )
            dequantized = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            with torch.no_grad():
                getattr(hf.model.layers[layer].mlp.experts, name).copy_(dequantized)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours", dtype=torch.float32).eval()
    assert ours.cfg.moe is not None and ours.cfg.moe.expert_bias
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-4
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"quantization_config=.*is not supported.*MXFP4"):
        import_hf(tmp_path / "hf", tmp_path / "refused")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 150000.0}),
         r"rope_parameters\.rope_type='dynamic' is not supported"),
        (dict(layer_types=["chunked_attention"] * 3), r"layer_types=.* is not supported"),
    ],
)  # fmt: skip
def test_settings_moekit_cannot_carry_are_refused_by_name(tmp_path, tokenizer, change, match):  # noqa: F811
    make_hf("gpt_oss", tmp_path / "hf", tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedError, match=match):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_model_trained_in_moekit_exports_to_transformers(tmp_path, tokenizer):  # noqa: F811
    """gpt-oss's options on a model built in moekit (sliding window on the middle layer only),
    trained a few steps (sinks and biases learn), exported, and run by transformers."""
    cfg = ModelConfig.from_dict(
        dict(vocab_size=VOCAB, dim=64, num_layers=3, num_heads=4, num_kv_heads=2,
             max_seq_len=64, activation="clamped_swiglu", swiglu_limit=2.0,
             attention=dict(qkv_bias=True, o_bias=True, sinks=True, sliding_window=6,
                            sliding_layers=[1]),
             moe=dict(num_experts=4, top_k=2, expert_hidden=32, router_bias=True,
                      expert_bias=True))
    )  # fmt: skip
    model = build_model(cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ("layers.1.attn.sinks", "layers.1.ffn.experts.b_down", "layers.1.ffn.router.bias"):
        assert model.get_parameter(name).abs().sum() > 0, name  # all start at 0
    save_model(model.eval(), cfg, tmp_path / "ours")
    tokenizer.save(tmp_path / "ours")
    assert export_hf(tmp_path / "ours", tmp_path / "hf") == "GptOssForCausalLM"
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_import_quantises_the_experts_and_keeps_their_biases(tmp_path, tokenizer):  # noqa: F811
    """`import_hf(quantize=8)`: packed experts, float biases, outputs close to transformers'."""
    from safetensors import safe_open

    hf = make_hf("gpt_oss", tmp_path / "hf", tokenizer)
    cfg = import_hf(tmp_path / "hf", tmp_path / "int8", quantize=8)
    assert cfg.quantization is not None and cfg.quantization.bits == 8
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "layers.0.ffn.experts.w_up.qweight" in names
    assert "layers.0.ffn.experts.b_up" in names and "layers.0.ffn.experts.w_up" not in names
    ours = load_model(tmp_path / "int8").eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (ours(tokens).logits - hf(tokens).logits).abs().max().item()
    assert 0 < diff < 0.1  # int8 experts: close (logits up to ~5), not equal; 1.5 without b_down
