"""Routing invariants, checked on random shapes and inputs (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.config import MoEConfig
from moekit.moe.router import TopKRouter, build_router


def make_router(dim=16, **kw):
    cfg = MoEConfig(**{"expert_hidden": 8, **kw})
    router = build_router(dim, cfg)
    router.init_weights(std=1.0)
    return router


token_choice = st.fixed_dictionaries(
    {
        "num_experts": st.sampled_from([1, 2, 4, 8, 16]),
        "score_func": st.sampled_from(["softmax", "sigmoid"]),
        "norm_topk_prob": st.booleans(),
        "routed_scaling_factor": st.sampled_from([1.0, 2.5]),
        "tokens": st.integers(1, 40),
        "seed": st.integers(0, 2**16),
    }
)


@given(token_choice, st.data())
def test_token_choice_picks_k_distinct_experts_with_promised_weights(p, data):
    E = p["num_experts"]
    K = data.draw(st.integers(1, E))
    router = make_router(num_experts=E, top_k=K, score_func=p["score_func"],
                         norm_topk_prob=p["norm_topk_prob"],
                         routed_scaling_factor=p["routed_scaling_factor"])  # fmt: skip
    torch.manual_seed(p["seed"])
    x = torch.randn(p["tokens"], 16)
    out = router(x)
    T = p["tokens"]
    assert out.weights.shape == out.experts.shape == (T, K)
    assert out.logits.shape == (T, E)
    assert out.weights.dtype == out.logits.dtype == torch.float32
    assert out.experts.dtype == torch.int64
    assert ((out.experts >= 0) & (out.experts < E)).all()
    for row in out.experts.tolist():
        assert len(set(row)) == K
    assert (out.weights >= 0).all()
    scores = out.logits.softmax(-1) if p["score_func"] == "softmax" else out.logits.sigmoid()
    # The chosen experts are the K best scores.
    kth = scores.topk(K, dim=-1).values[:, -1:]
    assert (scores.gather(1, out.experts) >= kth - 1e-6).all()
    sums = out.weights.sum(-1)
    scale = p["routed_scaling_factor"]
    if p["norm_topk_prob"]:
        torch.testing.assert_close(sums, torch.full_like(sums, scale))
    else:
        torch.testing.assert_close(out.weights, scores.gather(1, out.experts) * scale)
        if p["score_func"] == "softmax":
            assert (sums <= scale + 1e-5).all()


@given(st.integers(0, 2**16), st.sampled_from(["max", "top2_sum"]))
def test_group_limited_routing_stays_in_the_best_groups(seed, group_score):
    E, G, TG, K = 16, 4, 2, 4
    router = make_router(num_experts=E, top_k=K, score_func="sigmoid", num_groups=G,
                         topk_groups=TG, group_score=group_score)  # fmt: skip
    torch.manual_seed(seed)
    x = torch.randn(30, 16)
    out = router(x)
    scores_TGE = out.logits.sigmoid().view(30, G, E // G)
    if group_score == "max":
        group = scores_TGE.max(-1).values
    else:
        group = scores_TGE.topk(2, -1).values.sum(-1)
    best = group.topk(TG, -1).indices
    chosen_groups = out.experts // (E // G)
    scores = out.logits.sigmoid()
    for t in range(30):
        allowed = set(best[t].tolist())
        assert set(chosen_groups[t].tolist()) <= allowed
        # ... and they are the K best experts inside the allowed groups.
        inside = [e for e in range(E) if e // (E // G) in allowed]
        top = sorted(inside, key=lambda e: -float(scores[t, e]))[:K]
        assert set(out.experts[t].tolist()) == set(top)


def test_selection_bias_changes_choice_but_not_weights():
    router = make_router(num_experts=4, top_k=1, score_func="sigmoid", norm_topk_prob=False,
                         bias_update_rate=0.01)  # fmt: skip
    assert isinstance(router, TopKRouter) and router.selection_bias is not None
    x = torch.randn(20, 16)
    before = router(x)
    router.selection_bias[2] = 100.0
    after = router(x)
    assert (after.experts == 2).all()
    torch.testing.assert_close(after.weights[:, 0], after.logits[:, 2].sigmoid())
    torch.testing.assert_close(after.logits, before.logits)


def test_switch_uses_the_raw_probability():
    router = make_router(num_experts=4, top_k=1, router="switch")
    out = router(torch.randn(10, 16))
    probs = out.logits.softmax(-1)
    torch.testing.assert_close(out.weights[:, 0], probs.max(-1).values)
    assert out.weights.requires_grad


def test_router_stays_float32_under_bf16():
    router = make_router(num_experts=4, top_k=2)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32


def test_jitter_only_while_training():
    router = make_router(num_experts=8, top_k=2, router_jitter=0.5)
    x = torch.randn(64, 16)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.allclose(router(x).logits, router(x).logits)


expert_choice = st.fixed_dictionaries(
    {
        "num_experts": st.sampled_from([2, 4, 8]),
        "capacity_factor": st.sampled_from([0.5, 1.0, 2.0, 3.0]),
        "batch": st.integers(1, 3),
        "seq": st.integers(1, 12),
        "seed": st.integers(0, 2**16),
    }
)


@given(expert_choice)
def test_expert_choice_fills_each_expert_to_capacity(p):
    p["capacity_factor"] = min(p["capacity_factor"], p["num_experts"])
    router = make_router(num_experts=p["num_experts"], top_k=1, router="expert_choice",
                         capacity_factor=p["capacity_factor"])  # fmt: skip
    torch.manual_seed(p["seed"])
    T = p["batch"] * p["seq"]
    out = router(torch.randn(T, 16))
    C = min(T, max(1, math.ceil(p["capacity_factor"] * T / p["num_experts"])))
    valid = out.experts >= 0
    counts = torch.bincount(out.experts[valid], minlength=p["num_experts"])
    assert (counts == C).all()  # never over capacity, and never idle
    assert (out.weights[~valid] == 0).all()
    assert (out.weights[valid] > 0).all()
    for row in out.experts.tolist():
        chosen = [e for e in row if e >= 0]
        assert len(set(chosen)) == len(chosen)
    # Each expert took the tokens that score it highest.
    scores = out.logits.softmax(-1)
    for e in range(p["num_experts"]):
        taken = (out.experts == e).any(-1)
        if (~taken).any():
            assert scores[taken, e].min() >= scores[~taken, e].max() - 1e-6


@given(expert_choice)
def test_causal_expert_choice_is_token_choice_over_the_same_scores(p):
    E = p["num_experts"]
    cf = min(p["capacity_factor"], E)
    router = make_router(num_experts=E, top_k=1, router="expert_choice", capacity_factor=cf,
                         expert_choice_causal=True)  # fmt: skip
    torch.manual_seed(p["seed"])
    out = router(torch.randn(p["batch"] * p["seq"], 16))
    K = min(E, math.ceil(cf))
    assert out.experts.shape[1] == K and (out.experts >= 0).all()
    scores = out.logits.softmax(-1)
    torch.testing.assert_close(out.weights, scores.gather(1, out.experts))
    torch.testing.assert_close(out.weights, scores.topk(K, -1).values)
    # One token at a time gives the same routing as the whole batch.
    x = torch.randn(5, 16)
    whole = router(x)
    for t in range(5):
        single = router(x[t : t + 1])
        assert single.experts.tolist() == whole.experts[t : t + 1].tolist()


@given(expert_choice, st.data())
def test_causal_expert_choice_never_looks_ahead(p, data):
    E, S = p["num_experts"], p["seq"]
    router = make_router(num_experts=E, top_k=1, router="expert_choice",
                         capacity_factor=min(p["capacity_factor"], E))  # fmt: skip
    torch.manual_seed(p["seed"])
    x = torch.randn(p["batch"], S, 16)
    j = data.draw(st.integers(0, S - 1))
    y = x.clone()
    y[:, j:] = torch.randn_like(y[:, j:])
    a = router(x.view(-1, 16), causal=True)
    b = router(y.view(-1, 16), causal=True)
    earlier = (torch.arange(S) < j).repeat(p["batch"])
    assert torch.equal(a.experts[earlier], b.experts[earlier])
    torch.testing.assert_close(a.weights[earlier], b.weights[earlier])


def test_batch_expert_choice_does_look_ahead():
    """The leak that causal mode exists to prevent: a later token changes an earlier choice."""
    router = make_router(num_experts=2, top_k=1, router="expert_choice", capacity_factor=1.0)
    x = torch.randn(1, 8, 16)
    base = router(x.view(-1, 16))
    leaked = False
    for _ in range(20):
        y = x.clone()
        y[0, -1] = torch.randn(16) * 10
        other = router(y.view(-1, 16))
        if not torch.equal(base.experts[:7], other.experts[:7]):
            leaked = True
            break
    assert leaked


def test_per_token_expert_counts():
    router = make_router(num_experts=8, top_k=2)
    x = torch.randn(4, 16)
    counts = torch.tensor([1, 2, 3, 8])
    out = router(x, top_k=counts)
    assert out.experts.shape == (4, 8)
    for t, k in enumerate(counts.tolist()):
        chosen = [e for e in out.experts[t].tolist() if e >= 0]
        assert len(chosen) == k
        assert chosen == router(x[t : t + 1], top_k=k).experts[0].tolist()
        torch.testing.assert_close(out.weights[t].sum(), torch.tensor(1.0))
    assert (out.weights[out.experts < 0] == 0).all()
    with pytest.raises(ValueError, match=r"top_k=0\.\.2 is invalid for this model"):
        router(x, top_k=torch.tensor([0, 2, 1, 1]))
    switch = make_router(num_experts=8, top_k=1, router="switch")
    with pytest.raises(ValueError, match=r"must be in 1\.\.1"):
        switch(x, top_k=2)
