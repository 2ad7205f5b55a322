"""Hierarchical routing: a group router picks k1 of G groups, an expert router picks k2 experts
inside each; weights are the product of the two levels; both levels balance and train."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import Generator, ModelDir, SamplingParams, build_model, count_params, load_model
from moekit.config import ModelConfig, MoEConfig
from moekit.moe import losses
from moekit.moe.layer import MoELayer
from moekit.moe.router import HierarchicalRouter, build_router
from moekit.training.trainer import train


def hier(**kw):
    base = dict(num_experts=8, top_k=4, expert_hidden=8, router="hierarchical", router_groups=4,
                group_top_k=2)  # fmt: skip
    return MoEConfig(**{**base, **kw})


def make(dim=16, std=1.0, **kw):
    router = build_router(dim, hier(**kw))
    assert isinstance(router, HierarchicalRouter)
    router.init_weights(std=std)
    return router


def levels(router, x_TD):
    """p(g) (T, G) and p(e|g) (T, G, E/G) computed from the two weight matrices directly."""
    p_g = F.linear(x_TD, router.group_weight).softmax(-1)
    inner = F.linear(x_TD, router.weight).view(len(x_TD), router.groups, -1).softmax(-1)
    return p_g, inner


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([(8, 4, 2, 2), (8, 2, 1, 2), (12, 3, 2, 3), (16, 4, 3, 1), (6, 6, 6, 1)]),
    st.integers(1, 30),
    st.integers(0, 2**16),
)
def test_each_token_gets_k1_groups_of_k2_experts_weighted_by_the_product(shape, T, seed):
    E, G, k1, k2 = shape
    router = make(num_experts=E, router_groups=G, group_top_k=k1, top_k=k1 * k2,
                  norm_topk_prob=False)  # fmt: skip
    torch.manual_seed(seed)
    x = torch.randn(T, 16)
    out = router(x)
    assert out.experts.shape == out.weights.shape == (T, k1 * k2)
    assert out.logits.shape == (T, E)
    p_g, inner = levels(router, x)
    best_groups = p_g.topk(k1, -1).indices
    per = E // G
    for t in range(T):
        row = out.experts[t].tolist()
        assert len(set(row)) == k1 * k2 and all(0 <= e < E for e in row)
        groups = {e // per for e in row}
        assert groups == set(best_groups[t].tolist())
        for g in groups:  # k2 experts in each chosen group: its k2 best
            mine = sorted(e % per for e in row if e // per == g)
            assert mine == sorted(inner[t, g].topk(k2).indices.tolist())
    product = p_g.gather(1, out.experts // per) * inner.flatten(1).gather(1, out.experts)
    torch.testing.assert_close(out.weights, product)
    # The returned logits are the joint distribution's: softmax over E is p(g) * p(e|g).
    torch.testing.assert_close(out.logits.softmax(-1), (p_g.unsqueeze(-1) * inner).flatten(1))


def test_renormalised_weights_keep_the_products_proportions_and_sum_to_one():
    router = make(norm_topk_prob=True, routed_scaling_factor=2.0)
    x = torch.randn(20, 16)
    out = router(x)
    p_g, inner = levels(router, x)
    product = p_g.gather(1, out.experts // 2) * inner.flatten(1).gather(1, out.experts)
    torch.testing.assert_close(out.weights, 2.0 * product / product.sum(-1, keepdim=True))


def test_per_call_top_k_keeps_the_heaviest_inside_the_chosen_groups():
    router = make(norm_topk_prob=False)
    x = torch.randn(12, 16)
    full = router(x)
    for k in (1, 3):
        part = router(x, top_k=k)
        assert part.experts.shape == (12, k)
        # ceil(k / k1) experts per chosen group, then the k heaviest of them.
        assert set(part.experts.flatten().div(2, rounding_mode="floor").tolist()) <= set(
            full.experts.flatten().div(2, rounding_mode="floor").tolist()
        )
        assert torch.equal(part.weights, part.weights.sort(-1, descending=True).values)
    one = router(x, top_k=1)
    assert torch.equal(one.weights[:, 0], full.weights.max(-1).values)
    counts = torch.tensor([1, 2, 3, 4] * 3)
    mixed = router(x, top_k=counts)
    assert torch.equal((mixed.experts >= 0).sum(-1), counts)
    with pytest.raises(ValueError, match=r"top_k=5 is invalid.*1\.\.4"):
        router(x, top_k=5)  # k1 = 2 groups of 2 experts hold 4


def balance(counts):
    counts = counts.float()
    return float(counts.max() / counts.mean())


def test_balance_losses_at_both_levels_are_differentiable_and_restore_balance():
    torch.manual_seed(0)
    layer = MoELayer(16, hier(top_k=2, group_top_k=2))  # k2 = 1 of 2 experts per group
    layer.init_weights(0.02, 0.02)
    with torch.no_grad():  # a skew: every token prefers group 0, and expert 0 inside it
        layer.router.group_weight[0] += 0.5
        layer.router.weight[0] += 0.5
    x = torch.randn(256, 16).abs()
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)

    def group_load():
        with torch.no_grad():
            experts = layer.router(x).experts
        return torch.zeros(4).index_add_(0, experts.flatten() // 2, torch.ones(experts.numel()))

    before = balance(group_load())
    _, stats = layer(x.view(1, 256, 16))
    assert stats.group_aux_loss is not None and stats.group_aux_loss > 1.2
    first = (float(stats.aux_loss.detach()), float(stats.group_aux_loss.detach()))
    grads = torch.autograd.grad(stats.group_aux_loss, [layer.router.group_weight])
    assert grads[0].abs().sum() > 0
    for _ in range(60):
        _, stats = layer(x.view(1, 256, 16))
        opt.zero_grad()
        (stats.aux_loss + stats.group_aux_loss).backward()
        opt.step()
    assert before >= 1.9  # two of four groups take every token
    # Both losses fall to about 1 (balanced in probability), and the load follows.
    assert first[1] > 1.8 and stats.group_aux_loss < 1.1
    assert first[0] > 3.5 and stats.aux_loss < 1.3
    assert balance(group_load()) < before - 0.2


def test_group_balance_loss_is_one_when_uniform_and_counts_a_group_once_per_token():
    probs = torch.full((4, 8), 1 / 8)
    experts = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])  # each token in one group of 2
    assert float(losses.group_balance_loss(probs, experts, 4)) == pytest.approx(1.0)
    skewed = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    assert float(losses.group_balance_loss(probs, skewed, 4)) == pytest.approx(1.0)  # P flat
    onto = torch.zeros(4, 8)
    onto[:, :2] = 0.5
    assert float(losses.group_balance_loss(onto, skewed, 4)) == pytest.approx(4.0)


def test_group_selection_bias_changes_the_groups_and_its_updates_balance_them():
    router = make(std=0.02, group_bias_update_rate=0.002, top_k=2, group_top_k=1)
    assert router.group_selection_bias is not None and router.selection_bias is None
    x = torch.randn(200, 16).abs()
    with torch.no_grad():
        router.group_weight[3] += 0.1  # group 3 wins for most tokens
        before = router(x)
        router.group_selection_bias[1] = 2.0  # the bias alone moves every token to group 1
        pushed = router(x)
        assert (pushed.experts // 2 == 1).all()
        # ... and leaves the weights as the scores give them.
        p_g, inner = levels(router, x)
        product = p_g[:, 1:2] * inner.flatten(1).gather(1, pushed.experts)
        torch.testing.assert_close(pushed.weights, product / product.sum(-1, keepdim=True))
        router.group_selection_bias.zero_()
        loads = []
        for _ in range(150):
            experts = router(x).experts
            counts = torch.bincount(experts.flatten(), minlength=8)
            loads.append(balance(counts.view(4, 2).sum(-1)))
            router.update_biases(counts)
    assert balance(torch.bincount(before.experts.flatten() // 2, minlength=4)) > 2.5
    assert max(loads[-10:]) < 1.5 < loads[0]


def test_expert_bias_balances_inside_each_group():
    router = make(std=0.02, bias_update_rate=0.002, top_k=2, group_top_k=2)
    x = torch.randn(200, 16).abs()

    def inner_balance():
        counts = torch.bincount(router(x).experts.flatten(), minlength=8).view(4, 2)
        return float((counts.max(-1).values / counts.float().mean(-1)).max())

    with torch.no_grad():
        router.weight[0::2] += 0.1  # the first expert of every group wins
        before = inner_balance()
        for _ in range(150):
            router.update_biases(torch.bincount(router(x).experts.flatten(), minlength=8))
        after = inner_balance()
    assert router.selection_bias is not None and router.group_selection_bias is None
    assert (router.selection_bias.view(4, 2)[:, 0] < 0).all()  # the winners pushed down
    assert before > 1.8 and after < 1.3


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(router_groups=3), r"router_groups=3 .*must divide num_experts \(8\)"),
        (dict(router_groups=1), r"router_groups=1 .*must be >= 2"),
        (dict(group_top_k=5), r"group_top_k=5 .*must be <= router_groups \(4\)"),
        (dict(top_k=3), r"top_k=3 .*multiple of group_top_k \(2\)"),
        (dict(top_k=6), r"top_k=6 .*asks 3 experts of each chosen group.*holds 2"),
        (dict(num_groups=2), r"num_groups=2 .*must be 1 with router='hierarchical'"),
        (dict(score_func="sigmoid"), r"score_func='sigmoid' .*must be 'softmax'"),
        (dict(group_bias_update_rate=-1.0), r"group_bias_update_rate=-1.0"),
        (dict(router="topk", group_top_k=1, router_groups=4), r"router_groups=4 .*only used"),
        (dict(router="topk", router_groups=1, group_top_k=2), r"group_top_k=2 .*only used"),
    ],
)
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        hier(**kw)


TINY = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip


def test_accounting_counts_the_group_router_as_router():
    cfg = ModelConfig.from_dict(
        {
            **TINY,
            "moe": dict(
                num_experts=8,
                top_k=2,
                expert_hidden=16,
                router="hierarchical",
                router_groups=4,
                group_top_k=2,
            ),
        }
    )
    model = build_model(cfg)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    routers = [m.router for m in model.moe_layers().values()]
    assert pc.total_by["router"] == sum(p.numel() for r in routers for p in r.parameters())
    assert pc.active_by["router"] == 2 * (8 + 4) * 32


def test_a_tiny_hierarchical_model_trains_saves_loads_and_generates(tmp_path, tiny_run_config):
    cfg = tiny_run_config(
        "train.max_steps=24", "model.moe.router=hierarchical", "model.moe.router_groups=4",
        "model.moe.group_top_k=2", "model.moe.group_bias_update_rate=0.01",
    )  # fmt: skip
    result = train(cfg, tmp_path / "run", verbose=False, report=False)
    records = [r for r in ModelDir(tmp_path / "run").read_metrics() if r["kind"] == "train"]
    curve = [r["loss"] for r in records]
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.5
    assert result.val_loss is not None and result.val_loss < curve[0]
    assert set(records[-1]["balance_loss"]) == {"expert", "group"}
    assert records[-1]["balance_loss"]["group"] > 0
    model = load_model(tmp_path / "run")
    routers = [layer.router for layer in model.moe_layers().values()]
    assert all(isinstance(r, HierarchicalRouter) for r in routers)
    # The group biases moved in training and came back with the model.
    biases = torch.stack([r.group_selection_bias for r in routers])  # type: ignore[misc]
    assert biases.abs().sum() > 0
    out = Generator.from_dir(tmp_path / "run", device="cpu").generate(
        ["The "], SamplingParams(max_new_tokens=6, temperature=0.0)
    )
    assert 1 <= len(out[0].token_ids) <= 6


def test_the_parallel_planner_counts_the_group_router():
    from moekit.parallel.plan import plan_parallel
    from moekit.presets import get_preset

    cfg = get_preset("demo-hierarchical")
    plan = plan_parallel(cfg, gpus=2)
    assert (
        plan.params
        == count_params(cfg).total
        == sum(p.numel() for p in build_model(cfg).parameters())
    )
