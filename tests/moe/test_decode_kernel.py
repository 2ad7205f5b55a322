"""The one-token experts kernel (moekit.moe.decode_kernel) against the per-expert eager loop,
for float and quantised experts, and its eager fallbacks. Tiny shapes: each compiles once."""

import logging

import pytest
import torch

from moekit.moe.experts import Experts, decode_experts
from moekit.quant.experts import QuantExperts

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 rounding: the kernel sums in another order


def _experts(num_experts=8, dim=64, hidden=32, seed=0):
    torch.manual_seed(seed)
    ex = Experts(num_experts, dim, hidden)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0.0, 0.1)
    return ex


def _both(store, x, experts, weights):
    """The kernel's result and the eager loop's, on the same store."""
    with torch.inference_mode():
        store.one_token_kernel = True
        got = decode_experts(x, experts, weights, store)
        store.one_token_kernel = False
        want = decode_experts(x, experts, weights, store)
    store.one_token_kernel = True
    return got, want


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_one_token_through_the_kernel_equals_the_eager_loop(bits):
    ex = _experts()
    store = ex if bits is None else QuantExperts.like(ex, bits, 32 if bits == 4 else None)
    x = torch.randn(1, 64)
    weights = torch.rand(1, 3).softmax(-1)
    for chosen in ([[5, 0, 7]], [[2, -1, 6]]):  # -1: an empty slot adds nothing
        got, want = _both(store, x, torch.tensor(chosen), weights)
        torch.testing.assert_close(got, want, **TOL)
    assert not any(k.failed for k in _kernels_of(store))  # it really compiled and ran (no fallback)


def _kernels_of(store):
    from moekit.moe.decode_kernel import swiglu_experts
    from moekit.quant.experts import _TOKEN_KERNELS

    if isinstance(store, QuantExperts):
        return [_TOKEN_KERNELS[store.bits].kernels]
    return [swiglu_experts.kernels]


def test_the_kernel_is_compiled_once_per_shape_and_reused():
    from moekit.moe.decode_kernel import swiglu_experts

    # A shape no other test or preset uses (a model of 6 experts, dim 32 and hidden 16 in
    # another test of the same process had compiled this test's former shape first).
    ex = _experts(num_experts=7, dim=36, hidden=20, seed=1)
    x, w = torch.randn(1, 36), torch.rand(1, 2)
    kernels = swiglu_experts.kernels
    before = set(kernels.compiled)
    seen = []
    for chosen in ([[0, 1]], [[4, 6]], [[3, 3]]):
        got, want = _both(ex, x, torch.tensor(chosen), w)
        torch.testing.assert_close(got, want, **TOL)
        seen.append(set(kernels.compiled))
    assert len(seen[0] - before) == 1  # compiled for this shape at the first call
    assert seen[0] == seen[1] == seen[2]  # and reused by the others


def test_several_tokens_and_gelu_experts_take_the_eager_loop():
    ex = _experts()
    assert ex.token_kernel() is not None
    assert Experts(4, 16, 8, activation="gelu").token_kernel() is None
    x, w = torch.randn(3, 64), torch.rand(3, 2)
    got, want = _both(ex, x, torch.tensor([[0, 1], [2, 3], [1, 4]]), w)
    assert torch.equal(got, want)  # both the eager loop: identical


def test_under_a_dispatch_mode_it_runs_eagerly_and_is_not_given_up(caplog):
    from moekit.bench.generate import count_calls

    ex = _experts(num_experts=5, dim=32, hidden=8, seed=2)
    x, e, w = torch.randn(1, 32), torch.tensor([[1, 3]]), torch.rand(1, 2)
    with caplog.at_level(logging.WARNING, logger="moekit"), torch.inference_mode():
        # An operator counter sees the eager loop's operators.
        assert count_calls(lambda: decode_experts(x, e, w, ex)) > 4
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]
    got, want = _both(ex, x, e, w)
    torch.testing.assert_close(got, want, **TOL)


def test_a_failed_compilation_logs_once_and_falls_back(caplog):
    ex = _experts(num_experts=3, dim=16, hidden=8, seed=3)  # a shape no other test compiles
    x, e, w = torch.randn(1, 16), torch.tensor([[0, 2]]), torch.rand(1, 2)
    with (
        caplog.at_level(logging.WARNING, logger="moekit"),
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}),
    ):
        for _ in range(3):
            got, want = _both(ex, x, e, w)
            torch.testing.assert_close(got, want, **TOL)
    failures = [r for r in caplog.records if "one-token experts kernel" in r.getMessage()]
    assert len(failures) == 1


def test_a_kernel_chosen_for_quantised_experts_is_the_one_that_runs():
    q = QuantExperts.like(_experts(), 4, 32)
    assert q.token_kernel() is not None  # "auto"
    q.w_down.kernel = "dequant"  # as `set_kernel(model, "dequant")` asks
    assert q.token_kernel() is None


def _reference(x, experts, weights, ex, scale_input=False):
    """Each token's chosen experts one at a time, weighted and summed (-1: nothing)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k, e in enumerate(experts[t].tolist()):
            if e < 0:
                continue
            w = weights[t, k]
            xin = x[t : t + 1] * w if scale_input else x[t : t + 1]
            gate = xin @ ex.w_gate[e].T
            y = (torch.nn.functional.silu(gate) * (xin @ ex.w_up[e].T)) @ ex.w_down[e].T
            out[t] += (y if scale_input else y * w)[0]
    return out


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("native_built", [False, True])
def test_large_experts_through_the_library_products_equal_a_plain_loop(
    monkeypatch, scale_input, native_built
):
    # With the native kernels not built (the library's products), and as built here (on an
    # AVX-512 CPU the native kernel computes them).
    from moekit.moe import native
    from moekit.moe.decode_kernel import grouped_swiglu

    if not native_built:
        monkeypatch.setattr(native, "_loaded", False)

    ex = _experts()
    x = torch.randn(3, 64)
    weights = torch.rand(3, 2).softmax(-1)
    with torch.inference_mode():
        gate_up = ex.fused_gate_up()
        empty = [[-1, -1], [-1, -1], [-1, -1]]  # no expert at all: zeros
        for chosen in ([[5, 0], [0, 7], [5, 5]], [[2, -1], [-1, -1], [6, 2]], empty):
            experts = torch.tensor(chosen)
            for rows in (1, 3):  # one token (its own path) and several, grouped by expert
                args = (x[:rows], experts[:rows], weights[:rows])
                got = grouped_swiglu(*args, gate_up, ex.w_down, scale_input)
                want = _reference(*args, ex, scale_input)
                torch.testing.assert_close(got, want, **TOL)


def test_the_library_operator_runs_unchanged_inside_a_compiled_graph():
    from moekit.moe.decode_kernel import grouped_swiglu

    ex = _experts(num_experts=5, dim=24, hidden=8)  # a shape of its own: compiled once here

    def step(x, experts, weights, gate_up, down):
        return grouped_swiglu(torch.tanh(x), experts, weights, gate_up, down, False) * 2.0

    compiled = torch.compile(step, dynamic=False, fullgraph=True)  # no graph break
    x, weights = torch.randn(1, 24), torch.rand(1, 2).softmax(-1)
    with torch.inference_mode():
        args = (ex.fused_gate_up(), ex.w_down)
        for chosen in ([[4, 1]], [[0, -1]]):  # the same graph for other experts
            experts = torch.tensor(chosen)
            want = _reference(torch.tanh(x), experts, weights, ex) * 2.0
            torch.testing.assert_close(compiled(x, experts, weights, *args), want, **TOL)


def test_the_library_operator_passes_torchs_operator_checks():
    from moekit.moe.decode_kernel import grouped_swiglu

    ex = _experts(num_experts=4, dim=16, hidden=8)
    with torch.no_grad():
        gate_up, down = ex.fused_gate_up().clone(), ex.w_down.detach().clone()
    x, weights = torch.randn(2, 16), torch.rand(2, 2).softmax(-1)
    for scale_input in (False, True):
        args = (x, torch.tensor([[3, 0], [1, -1]]), weights, gate_up, down, scale_input)
        torch.library.opcheck(grouped_swiglu, args)  # schema, fake tensor, aliasing


@pytest.mark.parametrize("avx512", [True, False])
def test_large_experts_take_the_library_products_on_avx512_cpus(monkeypatch, avx512):
    import moekit.moe.decode_kernel as dk

    monkeypatch.setattr(dk, "LIBRARY_CPU", avx512)
    ex = _experts()
    assert ex.token_kernel() is not None  # 32 x 64 weights: the generated kernel
    monkeypatch.setattr(dk, "LIBRARY_MIN_ELEMENTS", 32 * 64)
    # As large as the threshold: streamed (or the library's products) on AVX-512, the
    # generated kernel elsewhere.
    assert (ex.token_kernel() == ex._streamed) == avx512
    x, weights = torch.randn(1, 64), torch.rand(1, 3).softmax(-1)
    experts = torch.tensor([[5, 0, 7]])
    with torch.inference_mode():
        got = decode_experts(x, experts, weights, ex)
    torch.testing.assert_close(got, _reference(x, experts, weights, ex), **TOL)
