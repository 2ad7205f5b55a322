"""The KV cache's bookkeeping: positions, masks and row lengths under padding and slots."""

import pytest
import torch

from moekit import get_preset
from moekit.nn.kv_cache import KVCache


def cache(batch=2, max_len=8):
    return KVCache(get_preset("debug"), batch, max_len)


def test_positions_skip_padding_and_the_mask_hides_it():
    c = cache()
    valid = torch.tensor([[False, True, True], [True, True, True]])  # row 0 left-padded
    positions, mask = c.begin(3, valid)
    assert positions.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert mask is not None and mask.shape == (2, 1, 3, 3)
    # Row 0's real tokens never see the padding; each token sees itself and what came before.
    assert mask[0, 0, 2].tolist() == [False, True, True]
    assert mask[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    c.commit(3)
    assert c.end.tolist() == [3, 3]
    positions, mask = c.begin(1)
    assert positions.tolist() == [[2], [3]]  # the count of real tokens before the new one
    assert mask is not None and mask[0, 0, 0].tolist() == [False, True, True, True]


def test_no_mask_where_plain_attention_is_exact():
    c = cache()
    _, mask = c.begin(4)
    assert mask is None and c.causal_prefill  # first tokens, no padding: plain causal
    c.commit(4)
    _, mask = c.begin(1)
    assert mask is None and not c.causal_prefill  # one token on equal rows: see everything


def test_rows_without_a_real_token_do_not_grow():
    c = cache()
    c.begin(2, torch.tensor([[True, True], [False, False]]))
    c.commit(2)
    assert c.end.tolist() == [2, 0]


def test_writes_return_the_cached_span_and_overflow_is_refused():
    c = cache(batch=1, max_len=4)
    cfg = get_preset("debug")
    c.begin(3)
    k = torch.randn(1, cfg.kv_heads, 3, cfg.head_dim)
    keys, values = c.write(0, k, k + 1)
    assert keys.shape == (1, cfg.kv_heads, 3, cfg.head_dim) and torch.equal(keys, k)
    assert torch.equal(values, k + 1)
    c.commit(3)
    with pytest.raises(ValueError, match="would overflow"):
        c.begin(2)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        KVCache(cfg, 1, cfg.max_seq_len + 1)


def test_slots_share_storage_and_rows_move_between_caches():
    big, small = cache(batch=3), cache(batch=1)
    small.begin(2)
    small.write(0, torch.ones(1, 2, 2, 16), torch.ones(1, 2, 2, 16))
    small.commit(2)
    big.load_row(1, small)
    assert big.length(1) == 2 and big.valid[1].tolist()[:3] == [True, True, False]
    assert torch.equal(big.k[0][1, :, :2], small.k[0][0, :, :2])
    view = big.first_rows(2)
    view.end[1] += 1  # a view writes through to the cache it came from
    assert big.length(1) == 3
    big.clear_row(1)
    assert big.length(1) == 0 and not big.valid[1].any()
