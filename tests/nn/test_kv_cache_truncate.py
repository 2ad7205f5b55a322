"""KVCache.truncate_row: a row forgets its last positions, as if they had never been fed."""

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.nn.kv_cache import KVCache

CFG = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
           max_seq_len=64, moe=dict(num_experts=4, top_k=2, expert_hidden=16))  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig.from_dict(CFG), seed=0).eval()


@torch.no_grad()
def test_a_truncated_row_continues_as_if_the_dropped_tokens_were_never_fed(model):
    prompt, dropped, kept = [5, 9, 14, 3, 22], [40, 41, 42, 43], [60, 61, 62]
    cache = KVCache(model.cfg, 1, 20)
    model(torch.tensor([prompt]), cache=cache, causal_routing=True)
    model(torch.tensor([dropped]), cache=cache, causal_routing=True)
    assert cache.length(0) == 9
    cache.truncate_row(0, 6)  # keep the first dropped token only
    assert cache.length(0) == 6 and cache.valid[0].sum() == 6
    after = model(torch.tensor([kept]), cache=cache, causal_routing=True).logits
    fresh = KVCache(model.cfg, 1, 20)
    model(torch.tensor([prompt + dropped[:1]]), cache=fresh, causal_routing=True)
    expected = model(torch.tensor([kept]), cache=fresh, causal_routing=True).logits
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    full = model(torch.tensor([prompt + dropped[:1] + kept]), causal_routing=True).logits
    torch.testing.assert_close(after, full[:, -3:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_truncating_one_row_leaves_the_others_alone(model):
    # Row 0 is left-padded; truncating row 1 must not change what row 0 computes.
    tokens = torch.tensor([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    cache = KVCache(model.cfg, 2, 16)
    model(tokens, cache=cache, valid=valid, causal_routing=True)
    model(torch.tensor([[20, 21], [30, 31]]), cache=cache, causal_routing=True)
    cache.truncate_row(1, 5)
    assert cache.end.tolist() == [7, 5]
    out = model(torch.tensor([[22], [32]]), cache=cache, causal_routing=True).logits
    alone0 = model(torch.tensor([[7, 8, 9, 20, 21, 22]]), causal_routing=True).logits[:, -1]
    alone1 = model(torch.tensor([[11, 12, 13, 14, 15, 32]]), causal_routing=True).logits[:, -1]
    torch.testing.assert_close(out[0, -1], alone0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, -1], alone1[0], rtol=1e-5, atol=1e-5)


def test_truncating_past_the_end_is_refused(model):
    cache = KVCache(model.cfg, 1, 8)
    with pytest.raises(ValueError, match="cannot truncate row 0 of 0 positions to 3"):
        cache.truncate_row(0, 3)
    with pytest.raises(ValueError, match="to -1"):
        cache.truncate_row(0, -1)
