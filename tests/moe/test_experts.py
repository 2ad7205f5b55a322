"""Every expert backend against the eager reference: outputs and gradients."""

import pytest
import torch

from moekit.moe import dispatch
from moekit.moe.experts import BACKENDS, Experts, grouped_linear, select_backend

from ..conftest import DEVICES

FAST = [name for name in BACKENDS if name != "eager"]


def setup(
    E=6, D=16, F=24, T=20, K=2, activation="swiglu", dtype=torch.float32, empty=(3,), device="cpu"
):
    ex = Experts(E, D, F, activation).to(dtype)
    ex.init_weights(0.3, 0.3)
    x = torch.randn(T, D, dtype=dtype)
    # Random routing that never uses the experts in `empty`.
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    experts = torch.stack([allowed[torch.randperm(len(allowed))[:K]] for _ in range(T)])
    weights = torch.rand(T, K, dtype=dtype)
    return ex.to(device), x.to(device), experts.to(device), weights.to(device)


def run(name, ex, x, experts, weights):
    backend = BACKENDS[name]
    x = x.detach().requires_grad_(True)
    w = weights.detach().requires_grad_(True)
    p = dispatch.plan(experts, w, ex.num_experts, sort=backend.needs_sorted)
    y = backend.fn(dispatch.permute(x, p), p.expert_S, p.tokens_per_expert, p.weight_S, ex)
    out = dispatch.combine(y, p, x.shape[0])
    for param in ex.parameters():
        param.grad = None
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    grads = {"x": x.grad, "weights": w.grad}
    grads.update({n: p.grad.clone() for n, p in ex.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_eager(name, activation, dtype, device):
    ex, x, experts, weights = setup(activation=activation, dtype=dtype, device=device)
    ref_out, ref_grads = run("eager", ex, x, experts, weights)
    out, grads = run(name, ex, x, experts, weights)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys()
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], **tol, msg=key)
    # An expert that got no tokens gets an exactly zero gradient.
    assert (grads["w_up"][3] == 0).all() and (grads["w_down"][3] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backends_follow_autocast(name, device):
    """Inside autocast every backend computes in the autocast dtype, as F.linear does."""
    ex, x, experts, weights = setup(D=32, F=32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, grads = run(name, ex, x, experts, weights)
        ref, _ = run("eager", ex, x, experts, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)  # a few bf16 ulps
    exact, _ = run("eager", ex, x, experts, weights)
    torch.testing.assert_close(out.float(), exact, rtol=5e-2, atol=5e-2)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "k"), [(8, 4), (7, 5)], ids=["aligned", "unaligned"])
def test_grouped_linear_matches_per_expert_matmuls(dtype, n, k):
    """Both paths: the grouped GEMM kernel (aligned float32) and the slice-loop fallback."""
    w = torch.randn(4, n, k, dtype=dtype)
    counts = torch.tensor([3, 0, 2, 4])
    x = torch.randn(9, k, dtype=dtype)
    ref = torch.cat([x[0:3] @ w[0].T, x[3:5] @ w[2].T, x[5:9] @ w[3].T])
    torch.testing.assert_close(grouped_linear(x, w, counts), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("k", [1, 2, 16])
def test_grouped_linear_trains_for_any_width(dtype, n, k):
    """Narrow inputs or outputs (a LoRA rank of 2, or 4 in bf16) have rows too short for the
    grouped kernel's alignment: forward and backward still work and match per-expert
    matmuls."""
    w = torch.randn(4, n, k, dtype=dtype, requires_grad=True)
    x = torch.randn(9, k, dtype=dtype, requires_grad=True)
    counts = torch.tensor([3, 0, 2, 4])
    out = grouped_linear(x, w, counts)
    out.float().square().sum().backward()
    wr, xr = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref = torch.cat([xr[0:3] @ wr[0].T, xr[3:5] @ wr[2].T, xr[5:9] @ wr[3].T])
    ref.float().square().sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(w.grad, wr.grad, **tol)


def test_auto_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend("auto", 4096 * 2, 8, cpu).name == "grouped"
    assert select_backend("auto", 2, 8, cpu).name == "sliced"
    assert select_backend("auto", 2, 8, cuda).name == "gather"
    assert select_backend("eager", 2, 8, cpu).name == "eager"
    with pytest.raises(ValueError, match="unknown expert backend 'fast'; available: auto, eager"):
        select_backend("fast", 2, 8, cpu)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("activation", ["clamped_swiglu", "swiglu", "gelu"])
def test_biased_experts_match_eager(name, activation):
    """Expert biases (gpt-oss) and the clamped SwiGLU, with a limit low enough to clamp many
    values: every backend agrees with eager, gradients of the biases included."""
    from moekit.nn.mlp import Activation

    torch.manual_seed(0)
    _, x, experts, weights = setup(dtype=torch.float64)
    act = Activation(activation, alpha=1.702, limit=0.8)
    biased = Experts(6, 16, 24, act, bias=True).to(torch.float64)
    with torch.no_grad():
        for p in biased.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ref_out, ref_grads = run("eager", biased, x, experts, weights)
    assert (ref_grads["b_down"][3] == 0).all() and ref_grads["b_up"][0].abs().sum() > 0
    out, grads = run(name, biased, x, experts, weights)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, **tol)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], **tol, msg=key)


def test_clamped_swiglu_is_gpt_oss_formula():
    from moekit.nn.mlp import Activation

    gate = torch.tensor([-9.0, -1.0, 0.5, 8.0])
    up = torch.tensor([-8.0, 2.0, 0.0, 9.0])
    got = Activation("clamped_swiglu")(gate, up)
    g = gate.clamp(max=7.0)
    expected = (up.clamp(-7.0, 7.0) + 1) * g * torch.sigmoid(1.702 * g)
    torch.testing.assert_close(got, expected)
    assert got[3] == pytest.approx(8.0 * 7.0 * torch.sigmoid(torch.tensor(1.702 * 7.0)).item())
