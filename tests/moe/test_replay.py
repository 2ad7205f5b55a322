"""Routing replay: a recorded routing, forced on a router or a model, gives the recorded weights
and logits exactly, and gradients reach the router; bad routings are refused by name."""

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig, MoEConfig
from moekit.infer.routing_replay import recorded_experts
from moekit.moe.router import build_router

BASE = dict(vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip
MOE = dict(num_experts=8, top_k=2, expert_hidden=16, first_dense_layers=1)

ROUTERS = {
    "softmax": dict(MOE, norm_topk_prob=False),
    "softmax-renormalised": dict(MOE, norm_topk_prob=True),
    "sigmoid-bias-scaled": dict(MOE, score_func="sigmoid", norm_topk_prob=True,
                                bias_update_rate=0.01, routed_scaling_factor=2.5),
    "sigmoid-groups": dict(MOE, score_func="sigmoid", num_groups=4, topk_groups=2,
                           group_score="top2_sum", bias_update_rate=0.01),
    "switch": dict(MOE, router="switch", top_k=1),
    "shared": dict(MOE, num_shared_experts=1, shared_expert_gate=True),
    "expert-choice-batch": dict(MOE, router="expert_choice", capacity_factor=1.5),
    "hierarchical": dict(MOE, router="hierarchical", router_groups=4, group_top_k=2),
    "hierarchical-biases": dict(MOE, router="hierarchical", router_groups=2, group_top_k=1,
                                bias_update_rate=0.01, group_bias_update_rate=0.01),
    "expert-choice-causal": dict(MOE, router="expert_choice", capacity_factor=1.5,
                                 expert_choice_causal=True),
}  # fmt: skip


def model_with(moe, seed=0):
    model = build_model(ModelConfig.from_dict({**BASE, "moe": moe}), seed=seed)
    for layer in model.moe_layers().values():
        if layer.router.selection_bias is not None:  # a bias that really changes choices
            layer.router.selection_bias.copy_(torch.randn(8) * 0.3)
    return model


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_replaying_its_own_choice_gives_its_weights_exactly(name):
    router = build_router(16, MoEConfig(**ROUTERS[name]))
    router.init_weights(std=1.0)
    if router.selection_bias is not None:
        router.selection_bias.copy_(torch.randn(8))
    x = torch.randn(30, 16)
    for top_k in (None, torch.randint(1, 3, (30,))):
        if name == "expert-choice-batch" and top_k is not None:
            continue
        if name == "switch" and top_k is not None:
            top_k = torch.ones(30, dtype=torch.long)
        own = router(x, top_k=top_k)
        replayed = router(x, experts=own.experts)
        assert torch.equal(replayed.experts, own.experts)
        assert torch.equal(replayed.weights, own.weights)
        assert torch.equal(replayed.logits, own.logits)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_model_replaying_a_recorded_routing_gives_its_logits_and_gradients(name):
    model = model_with(ROUTERS[name])
    tokens = torch.randint(0, 64, (2, 10))
    causal = name != "expert-choice-batch"
    own = model(tokens, causal_routing=causal, return_routing=True)
    routed = recorded_experts(own, 2, 10)
    assert routed.shape[:3] == (2, 10, 2)
    own_loss = own.logits.logsumexp(-1).mean() + own.aux_loss
    own_grads = torch.autograd.grad(
        own_loss, [r.router.weight for r in model.moe_layers().values()]
    )
    replay = model(tokens, causal_routing=causal, routed_experts=routed, return_routing=True)
    assert torch.equal(recorded_experts(replay, 2, 10), routed)
    assert torch.equal(replay.logits, own.logits)
    loss = replay.logits.logsumexp(-1).mean() + replay.aux_loss
    grads = torch.autograd.grad(loss, [r.router.weight for r in model.moe_layers().values()])
    for g, ref in zip(grads, own_grads, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_forced_experts_are_used_and_weighted_from_the_router_scores():
    model = model_with(dict(MOE, norm_topk_prob=True)).eval()
    tokens = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        own = model(tokens, causal_routing=True, return_routing=True)
        # Each token's two least likely experts: never the router's own choice.
        forced = torch.stack(
            [
                s.routing.logits.topk(2, largest=False).indices
                for _, s in sorted(own.moe_stats.items())
            ],
            dim=1,
        ).view(1, 6, 2, 2)
        out = model(tokens, causal_routing=True, routed_experts=forced, return_routing=True)
    assert torch.equal(recorded_experts(out, 1, 6), forced)
    assert not torch.allclose(out.logits, own.logits)
    for j, (_, stats) in enumerate(sorted(out.moe_stats.items())):
        probs = stats.routing.logits.softmax(-1).gather(1, forced[0, :, j])
        torch.testing.assert_close(stats.routing.weights, probs / probs.sum(-1, keepdim=True))


def test_fewer_experts_and_empty_slots_replay():
    model = model_with(dict(MOE)).eval()
    tokens = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        one = model(tokens, causal_routing=True, top_k=1, return_routing=True)
        routed = recorded_experts(one, 1, 5)
        assert routed.shape[-1] == 1
        assert torch.equal(
            model(tokens, causal_routing=True, routed_experts=routed).logits, one.logits
        )
        # The same routing with an empty second slot is the same routing.
        padded = torch.cat([routed, torch.full_like(routed, -1)], dim=-1)
        assert torch.equal(
            model(tokens, causal_routing=True, routed_experts=padded).logits, one.logits
        )


def test_routed_mask_replays_some_tokens_only():
    model = model_with(dict(MOE)).eval()
    tokens = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        own = model(tokens, causal_routing=True, return_routing=True)
        one = model(tokens, causal_routing=True, top_k=1, return_routing=True)
        mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
        out = model(tokens, causal_routing=True, return_routing=True,
                    routed_experts=recorded_experts(one, 2, 4), routed_mask=mask)  # fmt: skip
    got = recorded_experts(out, 2, 4)
    want = torch.where(
        mask[..., None, None],
        torch.nn.functional.pad(recorded_experts(one, 2, 4), (0, 1), value=-1),
        recorded_experts(own, 2, 4),
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("routed", "message"),
    [
        (torch.zeros(1, 4, 3, 2, dtype=torch.long), r"shape \(1, 4, 3, 2\).*\(1, 4, 2, K\)"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.long), r"shape \(1, 3, 2, 2\).*\(1, 4, 2, K\)"),
        (torch.full((1, 4, 2, 2), 8), r"expert id 8.*0\.\.7"),
        (torch.full((1, 4, 2, 2), -2), r"expert id -2"),
        (torch.zeros(1, 4, 2, 9, dtype=torch.long), r"9 expert slots.*1\.\.8"),
        (torch.zeros(1, 4, 2, 2, dtype=torch.long), r"expert twice for token 0"),
        (torch.zeros(1, 4, 2, 2), r"integer expert ids"),
    ],
)
def test_bad_routings_are_refused_by_name(routed, message):
    model = model_with(dict(MOE))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 4, dtype=torch.long), routed_experts=routed)


def test_switch_refuses_two_slots():
    model = model_with(dict(MOE, router="switch", top_k=1))
    routed = torch.tensor([0, 1]).expand(1, 4, 2, 2)
    with pytest.raises(
        ValueError, match=r"routed_experts \(MoE layer 1\) gives 2 expert slots.*1\.\.1"
    ):
        model(torch.zeros(1, 4, dtype=torch.long), routed_experts=routed)


def test_a_dense_model_refuses_a_routing():
    model = build_model(ModelConfig.from_dict(BASE))
    with pytest.raises(ValueError, match="no MoE layers"):
        model(torch.zeros(1, 4, dtype=torch.long), routed_experts=torch.zeros(1, 4, 0, 1))
