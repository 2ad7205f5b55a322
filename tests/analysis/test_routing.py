"""Load, capacity drops, co-activation and consistency on routings with known answers, and
the recording of a real model's routing."""

import math

import pytest
import torch

from moekit import build_model
from moekit.analysis.routing import (
    NEARLY_DEAD_FRACTION,
    LayerTrace,
    RoutingTrace,
    capacity_drops,
    check_vocabulary,
    coactivation,
    conditional_coactivation,
    consistency,
    copies_per_token,
    dropped_at_capacity,
    expert_counts,
    jaccard,
    load_stats,
    prompt_usage,
    sample_tokens,
    token_entropy,
    top_pairs,
    trace_routing,
    weighted_jaccard,
)
from moekit.config import ModelConfig, MoEConfig
from moekit.data.corpus import Document
from moekit.moe import dispatch

TINY = dict(vocab_size=300, dim=32, num_layers=2, num_heads=2, ffn_hidden=64, max_seq_len=64)


def tiny_moe(**moe):
    cfg = ModelConfig.from_dict(
        dict(TINY, moe=dict(dict(num_experts=4, top_k=2, expert_hidden=32), **moe))
    )
    return build_model(cfg, seed=0)


def test_expert_counts_ignore_empty_slots():
    experts = torch.tensor([[0, 2], [2, -1], [-1, -1]])
    assert expert_counts(experts, 4).tolist() == [1, 0, 2, 0]


def test_load_stats_on_known_counts():
    s = load_stats(torch.tensor([50, 30, 19, 1, 0]))  # mean 20; 10% of it is 2
    assert s.imbalance == pytest.approx(50 / 20)
    assert s.cv == pytest.approx(torch.tensor([50.0, 30, 19, 1, 0]).std(unbiased=False) / 20)
    assert s.dead == [4]
    assert s.nearly_dead == [3, 4]
    assert s.share == pytest.approx([0.5, 0.3, 0.19, 0.01, 0.0])
    even = load_stats(torch.tensor([7, 7, 7, 7]))
    assert even.imbalance == 1.0 and even.cv == 0.0 and even.dead == even.nearly_dead == []


def test_the_one_health_rule_at_its_edges():
    s = load_stats([6, 0, 3, 1])  # mean 2.5; 10% of it is 0.25
    assert s.dead == [1] and s.nearly_dead == [1] and s.dying == []
    assert s.heaviest == 0 and load_stats([1, 4, 4]).heaviest == 1  # the lowest id of equals
    strict = load_stats([6, 0, 3, 1], nearly_dead_fraction=0.5)  # below 1.25
    assert strict.nearly_dead == [1, 3] and strict.dying == [3]
    assert load_stats([6, 0, 3, 1], nearly_dead_fraction=0.0).nearly_dead == [1]  # dead still
    empty = load_stats(torch.zeros(3, dtype=torch.long))
    assert math.isnan(empty.imbalance) and math.isnan(empty.cv)
    assert empty.dead == empty.nearly_dead == [0, 1, 2] and empty.share == [0.0] * 3


def test_the_doctor_default_is_the_rule_of_analyze():
    from moekit.analysis.doctor import DEAD_SHARE

    assert DEAD_SHARE == NEARLY_DEAD_FRACTION


def test_copies_per_token():
    assert copies_per_token(MoEConfig(num_experts=8, top_k=2, expert_hidden=8)) == 2
    ec = dict(num_experts=4, top_k=1, expert_hidden=8, router="expert_choice")
    assert copies_per_token(MoEConfig(**ec, capacity_factor=1.5)) == 2
    assert copies_per_token(MoEConfig(**ec, capacity_factor=3.5)) == 4


def test_a_tokenizer_larger_than_the_model_is_refused():
    class Big:
        vocab_size = 1000

    check_vocabulary(Big(), 1000, "m")
    with pytest.raises(ValueError, match="the tokenizer has 1000 tokens but the model 512"):
        check_vocabulary(Big(), 512, "m")


def test_dropped_at_capacity_on_known_counts():
    counts = torch.tensor([[5, 1, 0], [2, 2, 2]])
    assert dropped_at_capacity(counts, 2) == 3
    assert dropped_at_capacity(counts, torch.tensor([4, 1])) == 1 + 3
    assert dropped_at_capacity(counts, 10) == 0


@pytest.mark.parametrize("priority", ["weight", "position"])
def test_capacity_drops_agree_with_the_dispatch_that_training_runs(priority):
    gen = torch.Generator().manual_seed(0)
    rows, seq, e, k = 3, 16, 4, 2
    # A skewed router: expert 0 is everyone's favourite, so a capacity factor bites.
    scores = torch.rand(rows * seq, e, generator=gen) + torch.tensor([1.0, 0.3, 0, 0])
    weights, experts = scores.topk(k, dim=1)
    cfg = MoEConfig(num_experts=e, top_k=k, expert_hidden=8, capacity_priority=priority)
    per_row = torch.stack([expert_counts(r, e) for r in experts.view(rows, seq, k)])
    trace = RoutingTrace(
        num_experts=e,
        layers={0: LayerTrace(experts, torch.zeros(rows * seq), per_row)},
        row_lengths=torch.full((rows,), seq),
        row_batch=torch.zeros(rows, dtype=torch.long),  # one batch of three rows
        batch_size=rows,
        seq_len=seq,
    )
    capped = MoEConfig(
        num_experts=e, top_k=k, expert_hidden=8, capacity_priority=priority, capacity_factor=1.0
    )
    capacity = capped.capacity(seq if priority == "position" else rows * seq)
    plan = dispatch.plan(
        experts, weights, e, capacity=capacity, priority=priority, seq_len=seq, sort=False
    )
    assert int(plan.num_dropped) > 0
    assert capacity_drops(trace, 0, cfg, 1.0) == int(plan.num_dropped)


def test_coactivation_on_a_hand_made_routing():
    experts = torch.tensor([[0, 1], [1, 0], [0, 2], [3, -1]])
    counts = coactivation(experts, 4)
    assert counts.tolist() == [
        [3, 2, 1, 0],
        [2, 2, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 1],
    ]
    cond = conditional_coactivation(counts)
    assert cond[0, 1] == pytest.approx(2 / 3) and cond[1, 0] == pytest.approx(1.0)
    assert cond.diagonal().tolist() == [0, 0, 0, 0]
    assert top_pairs(counts, 5) == [(0, 1, 2), (0, 2, 1)]


def test_uniform_random_routing_gives_the_stated_conditional_coactivation():
    gen = torch.Generator().manual_seed(0)
    experts = torch.rand(20000, 8, generator=gen).topk(2, dim=1).indices
    cond = conditional_coactivation(coactivation(experts, 8))
    off = cond[~torch.eye(8, dtype=torch.bool)]
    assert off.mean() == pytest.approx(1 / 7, abs=1e-3)
    assert (off - 1 / 7).abs().max() < 0.02


def test_jaccard_identical_disjoint_and_partial():
    a = torch.tensor([3, 1, 0, 0])
    assert jaccard(a, a * 5) == 1.0 and weighted_jaccard(a, a * 5) == pytest.approx(1.0)
    b = torch.tensor([0, 0, 2, 4])
    assert jaccard(a, b) == 0.0 and weighted_jaccard(a, b) == 0.0
    c = torch.tensor([1, 0, 1, 0])
    assert jaccard(a, c) == pytest.approx(1 / 3)
    # shares a = (.75, .25, 0, 0), c = (.5, 0, .5, 0): min sums to .5, max to 1.5
    assert weighted_jaccard(a, c) == pytest.approx(0.5 / 1.5)
    assert jaccard(torch.zeros(3), torch.zeros(3)) == 1.0


def test_consistency_of_paraphrases_against_unrelated_pairs():
    # Pair i uses expert i in both prompts: paraphrases overlap fully, mismatches not at all.
    usage = torch.eye(3, dtype=torch.long) * 4
    c = consistency(usage, usage, ["x", "x", "y"])
    assert c.paraphrase_jaccard == 1.0 and c.paraphrase_weighted == 1.0
    assert c.unrelated_jaccard == 0.0 and c.unrelated_weighted == 0.0
    assert c.same_category_weighted == 0.0
    assert c.per_pair == [1.0, 1.0, 1.0]
    single = consistency(usage[:1], usage[:1])
    assert single.unrelated_weighted is None and single.same_category_weighted is None
    with pytest.raises(ValueError, match=r"\(P, E\)"):
        consistency(usage, usage[:2])


def test_token_entropy():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert token_entropy(probs).tolist() == pytest.approx([math.log(4), 0.0], abs=1e-6)


class _CharTokenizer:
    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_sample_tokens_shares_the_budget_between_domains():
    docs = [
        Document("a" * 5, "small", "s0"),
        Document("b" * 50, "big", "b0"),
        Document("c" * 50, "big2", "c0"),
    ]
    sample = sample_tokens(docs, _CharTokenizer(), 40)
    # "small" has 6 tokens (text + separator); the 34 left split 17/17.
    assert sample.tokens_per_domain() == {"small": 6, "big": 17, "big2": 17}
    assert sample.ids.numel() == 40
    assert sample.ids[:6].tolist() == [ord("a")] * 5 + [0]
    assert sample.domains.tolist() == [0] * 6 + [1] * 17 + [2] * 17
    with pytest.raises(ValueError, match="max_tokens"):
        sample_tokens(docs, _CharTokenizer(), 0)


def test_trace_routing_records_what_the_model_routes():
    model = tiny_moe()
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(0))
    trace = trace_routing(model, ids, seq_len=32, batch_size=2)
    assert set(trace.layers) == {0, 1}
    assert trace.row_lengths.tolist() == [32, 32, 32, 32, 22]
    assert trace.row_batch.tolist() == [0, 0, 1, 1, 2]
    out = model(ids[:64].view(2, 32), causal_routing=True, return_routing=True)
    for i, lt in trace.layers.items():
        assert lt.experts.shape == (150, 2)
        assert torch.equal(lt.experts[:64].long(), out.moe_stats[i].routing.experts)
        assert lt.row_counts.sum() == 300
        assert torch.equal(lt.row_counts[0], expert_counts(lt.experts[:32], 4))
        assert ((lt.entropy > 0) & (lt.entropy <= torch.log(torch.tensor(4.0)) + 1e-5)).all()
        assert torch.equal(trace.counts(i), lt.row_counts.sum(dim=0))
        assert trace.load(i).tokens_per_expert == trace.counts(i).tolist()
        assert trace.mean_entropy(i) == pytest.approx(float(lt.entropy.double().mean()))
    assert trace.tokens == 150 and trace.logits_dtypes == {"float32"}


def test_prompt_usage_in_padded_batches_equals_one_prompt_at_a_time():
    model = tiny_moe()
    prompts = [[5, 6, 7], [8] * 20, [9, 10], [11, 12, 13, 14]]
    batched = prompt_usage(model, prompts, pad_id=1, batch_size=3)
    alone = prompt_usage(model, prompts, pad_id=1, batch_size=1)
    for i in batched:
        assert torch.equal(batched[i], alone[i])
        assert batched[i].sum(dim=1).tolist() == [6, 40, 4, 8]
    with pytest.raises(ValueError, match="prompt 1"):
        prompt_usage(model, [[1], []])


def test_expert_choice_routing_is_traced_in_its_causal_mode():
    model = tiny_moe(router="expert_choice", capacity_factor=2.0)
    ids = torch.arange(40) % 300
    trace = trace_routing(model, ids, seq_len=20, batch_size=2)
    assert trace.layers[0].experts.shape == (40, 2)  # ceil(capacity_factor) experts per token
    assert (trace.layers[0].experts >= 0).all()


def test_dense_model_has_nothing_to_trace():
    dense = build_model(ModelConfig.from_dict(TINY), seed=0)
    with pytest.raises(ValueError, match="no MoE layers"):
        trace_routing(dense, torch.arange(10), seq_len=8, batch_size=1)
