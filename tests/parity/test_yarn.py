"""Scaled RoPE against transformers: the rotation tables of `moekit.nn.rope` (YaRN, linear,
Llama 3) against transformers' own, and, on tiny checkpoints written by transformers (those of
`test_hf` with YaRN, Mixtral with Llama 3 scaling, OLMoE with linear scaling), proof that the
scaling is what makes the logits agree: a model that drops it, or drops DeepSeek's softmax
correction, does not."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.config import ModelConfig, RopeScalingConfig  # noqa: E402
from moekit.data.tokenizer import Tokenizer  # noqa: E402
from moekit.interop.hf import import_hf  # noqa: E402
from moekit.model import Transformer  # noqa: E402
from moekit.model_dir import load_model  # noqa: E402
from moekit.nn.rope import inverse_frequencies, rope_tables  # noqa: E402

from .test_hf import VOCAB, make_hf  # noqa: E402

SETTINGS = [  # (head dim, rope_parameters): DeepSeek's YaRN, Qwen's, every optional setting
    (8, dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
             original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
             mscale_all_dim=1.0)),
    (64, dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
              original_max_position_embeddings=32768)),
    (32, dict(rope_type="yarn", rope_theta=500000.0, factor=8.0,
              original_max_position_embeddings=8192, beta_fast=16, beta_slow=2,
              attention_factor=0.8, truncate=False)),
    (16, dict(rope_type="yarn", rope_theta=10000.0, factor=16.0,
              original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=1.0)),
    (64, dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    (128, dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=8192)),
]  # fmt: skip
_OURS = {"rope_type": "kind", "original_max_position_embeddings": "original_max_seq_len"}


@pytest.mark.parametrize(
    "head_dim, params", SETTINGS, ids=lambda v: getattr(v, "get", str)("rope_type")
)
def test_rotation_tables_match_transformers(head_dim, params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072,
        rope_parameters=dict(params),
    )  # fmt: skip
    inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    positions = torch.arange(0, 131072, 97)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    theta = params["rope_theta"]
    scaling = RopeScalingConfig(
        **{_OURS.get(k, k): v for k, v in params.items() if k != "rope_theta"}
    )
    assert scaling.cos_sin_factor() == pytest.approx(factor, rel=1e-12)
    cpu = torch.device("cpu")
    assert torch.equal(inverse_frequencies(head_dim, theta, cpu, scaling), inv_freq)
    cos, sin = rope_tables(positions, head_dim, theta, torch.float32, scaling)
    torch.testing.assert_close(cos, emb.cos() * factor, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, emb.sin() * factor, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["The quick brown fox jumps over the lazy dog. " * 20], 300)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _without(cfg: ModelConfig, model: Transformer) -> Transformer:
    """The model `cfg` with `model`'s weights and unscaled RoPE."""
    plain = Transformer(dataclasses.replace(cfg, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


LINEAR = dict(rope_type="linear", rope_theta=10000.0, factor=4.0)
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)  # fmt: skip


@pytest.mark.parametrize(
    "name, overrides",
    [("deepseek_v2", {}), ("deepseek_v3-yarn", {}), ("qwen3_moe-yarn", {}),
     ("mixtral", dict(rope_parameters=LLAMA3)), ("olmoe", dict(rope_parameters=LINEAR))],
)  # fmt: skip
def test_scaling_is_what_makes_the_logits_agree(tmp_path, tokenizer, name, overrides):
    hf = make_hf(name, tmp_path / "hf", tokenizer, config_kw=overrides)
    cfg = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert cfg.rope_scaling is not None
    ours = load_model(tmp_path / "ours").eval()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(7))
    expected = _logits(hf, tokens)
    assert (_logits(ours, tokens) - expected).abs().max().item() <= 1e-4
    assert (_logits(_without(cfg, ours), tokens) - expected).abs().max().item() > 1e-3
    if cfg.attention.kind == "mla":  # DeepSeek: the softmax correction matters too
        assert cfg.rope_scaling.softmax_factor() > 1.0
        for block in ours.blocks():
            block.attn.scale = None
        assert (_logits(ours, tokens) - expected).abs().max().item() > 1e-3
