"""The decode path of the MoE layer (inference routing of a few tokens, no autograd) against
the reference backend: same outputs, same routing, and training still works afterwards."""

import pytest
import torch

from moekit.config import MoEConfig
from moekit.moe.layer import MoELayer, RouteOptions

DECODE = RouteOptions(causal=True)


def layer(dim=16, **kw):
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 24, **kw})
    torch.manual_seed(0)
    m = MoELayer(dim, cfg)
    m.init_weights(0.3, 0.3)
    return m.eval()


def reference(m, x, route=DECODE):
    """The same layer computed by the eager backend."""
    backend = m.backend
    m.backend = "eager"
    try:
        with torch.no_grad():
            return m(x, route=route)
    finally:
        m.backend = backend


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "gelu"},
        {"num_shared_experts": 1, "shared_expert_gate": True},
        {"router": "expert_choice", "capacity_factor": 2.0},
        {"score_func": "sigmoid", "routed_scaling_factor": 2.5},
    ],
)
def test_decode_path_matches_eager(batch, kw):
    activation = kw.pop("activation", "swiglu")
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 24, **kw})
    torch.manual_seed(0)
    m = MoELayer(16, cfg, activation).eval()
    m.init_weights(0.3, 0.3)
    x = torch.randn(batch, 1, 16)
    with torch.no_grad():
        assert m._decodes(batch * 2, DECODE)
        y, stats = m(x, route=DECODE)
    y_ref, stats_ref = reference(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert stats is not None and stats_ref is not None
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    torch.testing.assert_close(stats.entropy, stats_ref.entropy)


def test_per_token_counts_leave_empty_slots():
    m = layer()
    x = torch.randn(3, 1, 16)
    route = RouteOptions(causal=True, top_k=torch.tensor([1, 2, 1]), record=True)
    with torch.no_grad():
        y, stats = m(x, route=route)
    y_ref, _ = reference(m, x, route)
    assert stats is not None and stats.routing is not None
    assert (stats.routing.experts == -1).sum() == 2
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y1, _ = m(x[:1], route=RouteOptions(causal=True, top_k=1))
    y1_ref, _ = reference(m, x[:1], RouteOptions(causal=True, top_k=1))
    torch.testing.assert_close(y1, y1_ref, rtol=1e-5, atol=1e-6)


def test_without_stats_nothing_is_computed_or_returned():
    m = layer()
    with torch.no_grad():
        _, stats = m(torch.randn(1, 1, 16), route=RouteOptions(causal=True, stats=False))
    assert stats is None


def test_gate_and_up_are_fused_in_memory_and_keep_their_names_and_shapes():
    m = layer()
    names = {k: v.shape for k, v in m.state_dict().items()}
    with torch.no_grad():
        m(torch.randn(1, 1, 16), route=DECODE)
    ex = m.experts
    fused = ex.fused_gate_up()
    assert fused is not None and fused.shape == (8, 48, 16)
    # The parameters are views of the fused tensor: held once, updated together.
    assert ex.w_gate.data_ptr() == fused.data_ptr()
    assert {k: v.shape for k, v in m.state_dict().items()} == names
    with torch.no_grad():
        ex.w_up.copy_(torch.zeros_like(ex.w_up))
    assert fused[:, 24:].abs().sum() == 0
    # New storage (as `.to()` gives) is noticed and fused again.
    ex.w_gate.data = ex.w_gate.data.clone()
    assert ex.fused_gate_up().data_ptr() == ex.w_gate.data_ptr()


def test_training_after_decoding_matches_a_fresh_layer():
    m, fresh = layer(), layer()
    with torch.no_grad():
        m(torch.randn(2, 1, 16), route=DECODE)
    m.train()
    assert m.experts.w_gate.is_contiguous() and m.experts.w_up.is_contiguous()
    x = torch.randn(2, 5, 16)
    for mod in (m, fresh):
        y, _ = mod(x)
        y.sum().backward()
    torch.testing.assert_close(m.experts.w_gate.grad, fresh.experts.w_gate.grad)
    torch.testing.assert_close(m.experts.w_up.grad, fresh.experts.w_up.grad)


def test_autograd_and_adapters_keep_the_backends():
    m = layer()
    assert not m._decodes(2, DECODE)  # autograd is on
    with torch.no_grad():
        assert not m._decodes(2, RouteOptions())  # training routing
        assert not m._decodes(9 * 2, DECODE)  # more copies than experts
        m.backend = "sliced"
        assert not m._decodes(2, DECODE)  # a backend asked for by name


def test_decoding_in_inference_mode_leaves_trainable_weights():
    m = layer()
    with torch.inference_mode():
        m(torch.randn(1, 1, 16), route=DECODE)
        m.train()  # as a generator restoring training mode on its way out does
    y, _ = m(torch.randn(2, 3, 16))
    y.sum().backward()
    assert m.experts.w_gate.grad is not None and m.experts.w_up.grad is not None
