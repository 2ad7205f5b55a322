"""Weights fused in memory for inference: same outputs, parameters unchanged, adapters seen."""

import pytest
import torch
from torch import nn

from moekit.config import ModelConfig
from moekit.nn.attention import Attention
from moekit.nn.fuse import fuse, is_fused, plain
from moekit.nn.mlp import MLP
from moekit.nn.rope import rope_tables


def test_fuse_makes_the_parameters_views_of_one_tensor():
    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5, 4))
    before = torch.cat([a.detach(), b.detach()])
    fused = fuse([a, b], 0)
    assert torch.equal(fused, before) and is_fused(fused, [a, b], 0)
    assert a.is_contiguous() and b.is_contiguous() and a.requires_grad
    with torch.no_grad():
        b.mul_(2)
    assert torch.equal(fused[3:], before[3:] * 2)
    assert not is_fused(fused, [b, a], 0)
    a.data = a.data.clone()
    assert not is_fused(fused, [a, b], 0)


def test_fuse_inside_inference_mode_keeps_trainable_parameters():
    lin = nn.Linear(4, 4)
    with torch.inference_mode():
        fuse([lin.weight], 0)
    lin(torch.randn(2, 4)).sum().backward()  # would fail on an inference tensor
    assert lin.weight.grad is not None


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_fused_projection_matches(qkv_bias):
    cfg = ModelConfig(
        vocab_size=32, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden=64,
        attention={"qkv_bias": qkv_bias},
    )  # fmt: skip
    attn = Attention(cfg)
    attn.init_weights(0.2, 0.2)
    if qkv_bias:
        for lin in (attn.wq, attn.wk, attn.wv):
            nn.init.normal_(lin.bias)
    x = torch.randn(2, 3, 32)
    cos, sin = rope_tables(torch.arange(3), cfg.head_dim, 10000.0, torch.float32)
    y_ref = attn(x, cos, sin)
    with torch.no_grad():
        y = attn(x, cos, sin)
    assert attn._qkv.tensor is not None
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_mlp_fused_gate_up_matches_and_hooks_are_respected():
    mlp = MLP(16, 24)
    x = torch.randn(4, 16)
    y_ref = mlp(x)
    with torch.no_grad():
        y = mlp(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    mlp.w_up.register_forward_hook(lambda mod, inp, out: out * 0)
    assert not plain(mlp.w_gate, mlp.w_up)
    with torch.no_grad():
        assert mlp(x).abs().sum() == 0  # the hook ran: the projection was not fused
