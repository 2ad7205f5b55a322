"""YaRN against transformers: the rotation tables of `moekit.nn.rope` against transformers'
own `_compute_yarn_parameters`, and, on the tiny YaRN checkpoints of `test_hf`, proof that the
scaling is what makes the logits agree (a model that drops it, or drops DeepSeek's softmax
correction, does not)."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.config import ModelConfig, RopeScalingConfig  # noqa: E402
from moekit.data.tokenizer import Tokenizer  # noqa: E402
from moekit.interop.hf import import_hf  # noqa: E402
from moekit.model import Transformer  # noqa: E402
from moekit.model_dir import load_model  # noqa: E402
from moekit.nn.rope import _inv_freq, _yarn_key, rope_tables  # noqa: E402

from .test_hf import VOCAB, make_hf  # noqa: E402

SETTINGS = [  # (head dim, rope_parameters): DeepSeek's, Qwen's, and every optional setting
    (8, dict(rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    (64, dict(rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32768)),
    (32, dict(rope_theta=500000.0, factor=8.0, original_max_position_embeddings=8192,
              beta_fast=16, beta_slow=2, attention_factor=0.8, truncate=False)),
    (16, dict(rope_theta=10000.0, factor=16.0, original_max_position_embeddings=4096,
              mscale=0.707, mscale_all_dim=1.0)),
]  # fmt: skip


@pytest.mark.parametrize("head_dim, params", SETTINGS)
def test_rotation_tables_match_transformers(head_dim, params):
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    config = transformers.Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072,
        rope_parameters=dict(rope_type="yarn", **params),
    )  # fmt: skip
    inv_freq, factor = _compute_yarn_parameters(config)
    positions = torch.arange(0, 131072, 97)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    ours = {k: v for k, v in params.items() if k not in ("rope_theta",)}
    ours["original_max_seq_len"] = ours.pop("original_max_position_embeddings")
    scaling = RopeScalingConfig(**ours)
    cos, sin = rope_tables(positions, head_dim, params["rope_theta"], torch.float32, scaling)
    assert scaling.cos_sin_factor() == pytest.approx(factor, rel=1e-12)
    assert torch.equal(_inv_freq(head_dim, params["rope_theta"], torch.device("cpu"),
                                 _yarn_key(scaling)), inv_freq)  # fmt: skip
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


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3-yarn", "qwen3_moe-yarn"])
def test_yarn_is_what_makes_the_logits_agree(tmp_path, tokenizer, name):
    hf = make_hf(name, tmp_path / "hf", tokenizer)
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
