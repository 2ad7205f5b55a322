"""Dispatch invariants: counting sort, capacity, permutation and combine."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.moe import dispatch


@st.composite
def routings(draw, allow_empty=False):
    """A random (experts_TK, weights_TK) with K distinct experts per token (or -1 slots)."""
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if allow_empty:
        empty = torch.rand(T, K, generator=g) < 0.3
        experts = experts.masked_fill(empty, -1)
    weights = torch.rand(T, K, generator=g).masked_fill(experts < 0, 0.0)
    return experts, weights, E


@given(routings(allow_empty=True))
def test_counting_sort_groups_experts_stably(r):
    experts, weights, E = r
    p = dispatch.plan(experts, weights, E)
    valid = experts.reshape(-1) >= 0
    assert p.slot_S.numel() == int(valid.sum())
    # Rows grouped by expert, in expert order; within an expert, in token order.
    assert (p.expert_S[1:] >= p.expert_S[:-1]).all()
    same = p.expert_S[1:] == p.expert_S[:-1]
    assert (p.token_S[1:][same] > p.token_S[:-1][same]).all()
    # Exactly the valid slots, once each.
    assert sorted(p.slot_S.tolist()) == valid.nonzero().squeeze(1).tolist()
    # It is the stable argsort, found without a comparison sort.
    flat = experts.reshape(-1)
    ref = torch.sort(flat[valid], stable=True).indices
    torch.testing.assert_close(p.slot_S, valid.nonzero().squeeze(1)[ref])
    torch.testing.assert_close(p.expert_S, flat[p.slot_S])
    torch.testing.assert_close(p.weight_S, weights.reshape(-1)[p.slot_S])
    torch.testing.assert_close(p.tokens_per_expert, torch.bincount(flat[valid], minlength=E))
    assert int(p.num_dropped) == 0


@given(routings(allow_empty=True), st.booleans())
def test_permute_then_combine_is_the_identity(r, sort):
    experts, weights, E = r
    T, D = experts.shape[0], 5
    x = torch.randn(T, D)
    p = dispatch.plan(experts, torch.ones_like(weights), E, sort=sort)
    K = experts.shape[1]
    # Every valid slot appears exactly once, and each row is its slot's token.
    assert p.slot_S.unique().numel() == p.slot_S.numel() == int((experts >= 0).sum())
    torch.testing.assert_close(p.token_S, p.slot_S // K)
    permuted = dispatch.permute(x, p)
    torch.testing.assert_close(permuted, x[p.slot_S // K])
    # Scattering rows back to their slots inverts the permutation exactly.
    back = torch.zeros(experts.numel(), D)
    back[p.slot_S] = permuted
    valid = experts.reshape(-1) >= 0
    torch.testing.assert_close(back[valid], x.repeat_interleave(K, 0)[valid])
    # Summing each token's copies gives (number of copies) * x.
    copies = (experts >= 0).sum(-1, keepdim=True).float()
    torch.testing.assert_close(dispatch.combine(permuted, p, T), copies * x)


@given(routings(), st.integers(1, 10), st.booleans())
def test_capacity_is_never_exceeded_and_drops_the_lightest(r, capacity, sort):
    experts, weights, E = r
    p = dispatch.plan(experts, weights, E, capacity=capacity, sort=sort)
    assert (p.tokens_per_expert <= capacity).all()
    assert int(p.num_dropped) == int(p.routed_per_expert.sum() - p.tokens_per_expert.sum())
    torch.testing.assert_close(p.tokens_per_expert, torch.bincount(p.expert_S, minlength=E))
    torch.testing.assert_close(
        p.routed_per_expert, torch.bincount(experts.reshape(-1), minlength=E)
    )
    # No expert drops a copy while keeping a lighter one.
    kept = torch.zeros(experts.numel(), dtype=torch.bool)
    kept[p.slot_S] = True
    flat_e, flat_w = experts.reshape(-1), weights.reshape(-1)
    for e in range(E):
        mine = flat_e == e
        if (mine & ~kept).any():
            assert flat_w[mine & kept].min() >= flat_w[mine & ~kept].max()
            assert int((mine & kept).sum()) == capacity
    if not sort:
        assert (p.slot_S[1:] > p.slot_S[:-1]).all()
    torch.testing.assert_close(p.token_S, p.slot_S // experts.shape[1])


@given(routings(), st.integers(1, 10), st.sampled_from([None, 1, 2, 3]))
def test_position_priority_keeps_the_earliest_tokens_of_each_sequence(r, capacity, seqs):
    experts, weights, E = r
    T, K = experts.shape
    seq_len = T // seqs if seqs and T % seqs == 0 else None
    p = dispatch.plan(experts, weights, E, capacity=capacity, priority="position",
                      seq_len=seq_len)  # fmt: skip
    kept = torch.zeros(T * K, dtype=torch.bool)
    kept[p.slot_S] = True
    per_seq = seq_len or T
    for start in range(0, T, per_seq):
        block = slice(start * K, (start + per_seq) * K)
        flat_e, flat_kept = experts.reshape(-1)[block], kept[block]
        for e in range(E):
            mine = (flat_e == e).nonzero().squeeze(1)
            n_keep = min(capacity, len(mine))
            assert flat_kept[mine].tolist() == [True] * n_keep + [False] * (len(mine) - n_keep)


def test_combine_weights_and_sums_copies():
    experts = torch.tensor([[0, 1], [1, 2]])
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    p = dispatch.plan(experts, weights, 3)
    y = torch.arange(4.0).unsqueeze(1) + 1  # one output row per copy, in plan order
    # plan order: expert 0 (token 0), expert 1 (token 0, token 1), expert 2 (token 1)
    assert p.token_S.tolist() == [0, 0, 1, 1]
    scaled = y * p.weight_S.unsqueeze(1)
    out = dispatch.combine(scaled, p, 2)
    assert out.squeeze(1).tolist() == [1 * 0.25 + 2 * 0.75, 3 * 0.5 + 4 * 0.5]


def test_rank_within_expert():
    e = torch.tensor([2, 0, 2, 2, 0, 1])
    assert dispatch.rank_within_expert(e, 3).tolist() == [0, 0, 1, 2, 1, 0]
