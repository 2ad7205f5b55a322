import pytest
import torch

from moekit.config import MoEConfig
from moekit.moe import losses
from moekit.moe.experts import BACKENDS
from moekit.moe.layer import MoELayer, RouteOptions
from moekit.nn.mlp import MLP


def layer(dim=16, **kw):
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 24, **kw})
    m = MoELayer(dim, cfg)
    m.init_weights(0.3, 0.3)
    return m


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_one_expert_top1_equals_a_dense_mlp(backend):
    """With one expert and top-1 softmax routing, the MoE layer is its expert."""
    moe = layer(num_experts=1, top_k=1, backend=backend)
    mlp = MLP(16, 24)
    with torch.no_grad():
        mlp.w_gate.weight.copy_(moe.experts.w_gate[0])
        mlp.w_up.weight.copy_(moe.experts.w_up[0])
        mlp.w_down.weight.copy_(moe.experts.w_down[0])
    x = torch.randn(2, 5, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, _ = moe(xa)
    yb = mlp(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(moe.experts.w_gate.grad[0], mlp.w_gate.weight.grad)
    torch.testing.assert_close(moe.experts.w_up.grad[0], mlp.w_up.weight.grad)
    torch.testing.assert_close(moe.experts.w_down.grad[0], mlp.w_down.weight.grad)


def reference_moe(m: MoELayer, x_TD):
    """Token by token, straight from the definition."""
    route = m.router(x_TD)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(route.experts.shape[1]):
            e = int(route.experts[t, k])
            if e >= 0:
                out[t] += route.weights[t, k] * m.experts.expert_forward(x_TD[t : t + 1], e)[0]
    if m.shared is not None:
        shared = m.shared(x_TD)
        if m.shared_gate is not None:
            shared = shared * torch.sigmoid(m.shared_gate(x_TD))
        out = out + shared
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(score_func="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
        dict(num_shared_experts=2, shared_expert_hidden=8, shared_expert_gate=True),
        dict(router="switch", top_k=1),
        dict(router="expert_choice", top_k=1, capacity_factor=2.0),
    ],
    ids=["softmax", "sigmoid-groups", "shared-gate", "switch", "expert-choice"],
)
@pytest.mark.parametrize("backend", ["eager", "grouped", "auto"])
def test_layer_matches_the_token_by_token_definition(cfg, backend):
    m = layer(backend=backend, **cfg)
    x = torch.randn(1, 12, 16)
    y, stats = m(x)
    torch.testing.assert_close(y[0], reference_moe(m, x[0]), rtol=1e-5, atol=1e-5)
    assert int(stats.tokens_per_expert.sum()) > 0


def test_capacity_drops_and_reports():
    m = layer(num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(1, 16, 16)
    _, stats = m(x)
    capacity = m.cfg.capacity(16)
    assert capacity == 4
    assert int(stats.tokens_per_expert.sum()) == 32
    expected_drops = int((stats.tokens_per_expert - capacity).clamp_min(0).sum())
    assert int(stats.dropped) == expected_drops > 0


@pytest.mark.parametrize("priority", ["weight", "position"])
def test_causal_routing_ignores_the_capacity(priority):
    """Capacity is a training-time device: routing causally (generation, serving, evaluation)
    keeps every copy, exactly the dropless layer's output."""
    m = layer(num_experts=4, top_k=2, capacity_factor=0.5, capacity_priority=priority)
    x = torch.randn(2, 16, 16)
    y, stats = m(x, route=RouteOptions(causal=True))
    assert int(stats.dropped) == 0 and int(m(x)[1].dropped) > 0  # training still drops
    torch.testing.assert_close(y.view(-1, 16), reference_moe(m, x.view(-1, 16)))


def test_stats_losses_match_the_pure_functions():
    m = layer(z_loss_weight=0.1, aux_loss_weight=0.01)
    x = torch.randn(1, 10, 16)
    _, stats = m(x)
    route = m.router(x[0])
    probs = route.logits.softmax(-1)
    torch.testing.assert_close(stats.aux_loss, losses.load_balancing_loss(probs, route.experts))
    torch.testing.assert_close(stats.z_loss, losses.z_loss(route.logits))
    torch.testing.assert_close(m.weighted_loss(stats), 0.01 * stats.aux_loss + 0.1 * stats.z_loss)
    assert stats.aux_loss.requires_grad
    with torch.no_grad():
        _, quiet = m(x)
    assert float(quiet.aux_loss) == float(quiet.z_loss) == 0.0
    torch.testing.assert_close(quiet.tokens_per_expert, stats.tokens_per_expert)
    torch.testing.assert_close(quiet.entropy, stats.entropy)
    assert float(quiet.entropy) > 0


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_zero_tokens(router):
    extra = dict(router="expert_choice", top_k=1, capacity_factor=2.0) if router != "topk" else {}
    m = layer(**extra)
    x = torch.zeros(0, 3, 16, requires_grad=True)
    y, stats = m(x)
    assert y.shape == (0, 3, 16)
    assert int(stats.tokens_per_expert.sum()) == 0
    assert float(m.weighted_loss(stats)) == 0.0  # no NaN from a mean over nothing
    (y.sum() + m.weighted_loss(stats)).backward()


def test_unknown_backend_fails_at_construction():
    with pytest.raises(ValueError, match="unknown expert backend 'fastest'"):
        layer(backend="fastest")


def imbalance(counts):
    counts = counts.float()
    return float(counts.max() / counts.mean())


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    m = layer(num_experts=8, top_k=2, score_func="sigmoid", bias_update_rate=0.02)
    with torch.no_grad():
        m.router.weight[0] += 1.5  # every token now loves expert 0 ...
        m.router.weight[1] += 1.0  # ... and expert 1
    x = torch.randn(1, 256, 16).abs()  # positive inputs make the skew systematic
    with torch.no_grad():
        _, first = m(x)
        start = imbalance(first.tokens_per_expert)
        for _ in range(200):
            _, stats = m(x)
            m.update_bias(stats.tokens_per_expert)
        _, last = m(x)
    assert start > 3.0
    assert imbalance(last.tokens_per_expert) < 1.5
    assert m.router.selection_bias[0] < 0 < m.router.selection_bias[7]
    # The bias changed which experts are chosen, never the weights: they are still the
    # unbiased sigmoid scores of the chosen experts.
    route = m.router(x[0])
    scores = route.logits.sigmoid()
    chosen = scores.gather(1, route.experts)
    torch.testing.assert_close(route.weights, chosen / chosen.sum(-1, keepdim=True))


def test_bias_update_is_a_no_op_without_a_bias():
    m = layer()
    assert m.router.selection_bias is None
    m.update_bias(torch.ones(8))  # nothing to update, no error


def _llama4_layer(backend):
    return layer(
        num_experts=6, top_k=2, num_shared_experts=1, score_func="sigmoid",
        norm_topk_prob=False, scale_expert_input=True, backend=backend,
    )  # fmt: skip


def test_input_scaled_routing_weights_each_experts_input():
    """scale_expert_input: out = shared(x) + sum_k expert_k(w_k * x), token by token."""
    m = _llama4_layer("eager")
    x_TD = torch.randn(7, 16)
    route = m.router(x_TD)
    expected = m.shared(x_TD).clone()
    for t in range(7):
        for k in range(2):
            e, w = int(route.experts[t, k]), route.weights[t, k]
            expected[t] += m.experts.expert_forward(w * x_TD[t : t + 1], e)[0]
    got, _ = m(x_TD[None])
    torch.testing.assert_close(got[0], expected)
    output_scaled = _llama4_layer("eager")
    output_scaled.load_state_dict(m.state_dict())
    output_scaled.cfg.scale_expert_input = False
    assert not torch.allclose(output_scaled(x_TD[None])[0], got, atol=1e-3)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_input_scaled_routing_matches_eager_on_every_backend(backend):
    """Every backend computes input-scaled routing as the eager reference does: outputs and
    the gradients of the input, the router and the experts."""
    ref, other = _llama4_layer("eager"), _llama4_layer(backend)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, _ = ref(xa)
    yb, _ = other(xb)
    torch.testing.assert_close(yb, ya)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    for (name, pa), pb in zip(ref.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


def test_input_scaled_routing_decodes_as_it_trains():
    """Inference routing of a decode-sized batch (which skips the output-weighting decode
    kernels) gives the training path's output."""
    m = _llama4_layer("auto")
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        decoded, _ = m(x, route=RouteOptions(causal=True))
        trained, _ = m(x)
    torch.testing.assert_close(decoded, trained)
