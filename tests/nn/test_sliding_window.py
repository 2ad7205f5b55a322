"""Sliding-window attention and attention sinks: the window's reach, KV-cache decoding equal to
the full forward (with padding), and the options' validation."""

import pytest
import torch

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.model import build_model
from moekit.nn.kv_cache import KVCache


def config(window=4, layers=(0, 2), sinks=True, **attn):
    return ModelConfig(
        vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64, init_std=0.2,
        activation="clamped_swiglu",
        attention=AttentionConfig(
            qkv_bias=True, o_bias=True, sinks=sinks, sliding_window=window,
            sliding_layers=None if layers is None else list(layers), **attn,
        ),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router_bias=True,
                      expert_bias=True),
    )  # fmt: skip


def model(cfg):
    m = build_model(cfg, seed=0).eval()
    with torch.no_grad():  # biases and sinks start at 0: make them matter
        for name, p in m.named_parameters():
            if "bias" in name or name.endswith(("sinks", "b_up", "b_gate", "b_down")):
                p.copy_(torch.randn_like(p) * 0.5)
    return m


def test_the_window_limits_how_far_back_a_token_sees():
    """With a window on every layer, position t depends on tokens t - L*(W-1) .. t only."""
    cfg = config(window=2, layers=None)
    m = model(cfg)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % 64
    with torch.no_grad():
        a, b = m(tokens).logits, m(changed).logits
    reach = cfg.num_layers * (2 - 1)  # 3 positions
    assert not torch.allclose(a[0, reach], b[0, reach])
    torch.testing.assert_close(a[0, reach + 1 :], b[0, reach + 1 :], rtol=0, atol=0)


def test_a_window_as_wide_as_the_sequence_is_full_attention():
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    wide, full = model(config(window=10)), model(config(window=None, layers=None))
    full.load_state_dict(wide.state_dict())
    narrow = model(config(window=3))
    narrow.load_state_dict(wide.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(wide(tokens).logits, full(tokens).logits)
        assert not torch.allclose(narrow(tokens).logits, full(tokens).logits)


@pytest.mark.parametrize("sinks", [True, False])
def test_cached_decoding_equals_the_full_forward(sinks):
    """Prefill then one token at a time, two rows of different lengths (left padding): every
    position's logits equal the full forward of that row alone."""
    cfg = config(window=4, sinks=sinks)
    m = model(cfg)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 64, (14,), generator=gen), torch.randint(0, 64, (11,), generator=gen)]
    with torch.no_grad():
        expected = [m(r[None]).logits[0] for r in rows]
        cache = KVCache(cfg, 2, 20)
        pad = 14 - 11
        prompt = torch.stack([rows[0][:6], torch.cat([torch.zeros(pad, dtype=torch.long),
                                                      rows[1][: 6 - pad]])])  # fmt: skip
        valid = torch.ones(2, 6, dtype=torch.bool)
        valid[1, :pad] = False
        got = [[m(prompt, cache=cache, valid=valid).logits]]
        for t in range(6, 14):
            step = torch.stack([rows[0][t : t + 1], rows[1][t - pad : t - pad + 1]])
            got.append([m(step, cache=cache).logits])
    logits = torch.cat([g[0] for g in got], dim=1)  # (2, 14, V)
    torch.testing.assert_close(logits[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1, pad:], expected[1], rtol=1e-5, atol=1e-5)


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"sliding_window=0 is invalid"):
        AttentionConfig(sliding_window=0)
    with pytest.raises(ValueError, match=r"sliding_layers=\[1\] is invalid: needs sliding_window"):
        AttentionConfig(sliding_layers=[1])
    with pytest.raises(ValueError, match=r"sliding_layers=\[0, 5\] is invalid: lists layer"):
        config(layers=(0, 5))
    with pytest.raises(ValueError, match=r"sinks=True is invalid: is only used with kind='gqa'"):
        AttentionConfig(kind="mla", sinks=True, kv_lora_rank=8, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8)  # fmt: skip
    with pytest.raises(ValueError, match=r"swiglu_limit=3.0 is invalid: is only used with"):
        ModelConfig(vocab_size=8, dim=8, num_layers=1, num_heads=2, swiglu_limit=3.0)
    with pytest.raises(ValueError, match=r"router_bias=True is invalid"):
        MoEConfig(num_experts=4, top_k=1, expert_hidden=8, router="expert_choice",
                  capacity_factor=1.0, router_bias=True)  # fmt: skip
    cfg = config()
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_sink_attention_in_query_blocks_equals_one_block(monkeypatch):
    """Long prompts are attended in blocks of queries (bounded memory): the same numbers."""
    from moekit.nn import attention

    m = model(config(window=5))
    tokens = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = m(tokens).logits
        monkeypatch.setattr(attention, "SINK_QUERY_BLOCK", 4)
        torch.testing.assert_close(m(tokens).logits, whole, rtol=1e-6, atol=1e-6)
