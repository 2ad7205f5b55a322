"""Packed weights: the formats round-trip within their rounding bound, and every kernel
computes what dequantise-then-matmul computes."""

import pytest
import torch
import torch.nn.functional as F

from moekit.moe import dispatch
from moekit.moe.experts import BACKENDS, Experts
from moekit.quant import formats
from moekit.quant.experts import BACKEND, QuantExperts
from moekit.quant.weight import QuantLinear, QuantWeight

SETTINGS = [(8, None), (4, 32), (4, 64)]


@pytest.mark.parametrize(("bits", "group"), SETTINGS)
def test_quantize_round_trips_within_half_a_step(bits, group):
    w = torch.randn(3, 32, 128) * torch.linspace(0.01, 3, 128)  # columns of different scale
    parts = formats.quantize(w, bits, group)
    assert {k: tuple(v.shape) for k, v in parts.items()} == formats.stored_shapes(
        tuple(w.shape), bits, group
    )
    assert {k: v.dtype for k, v in parts.items()} == {
        k: formats.stored_dtypes(bits)[k] for k in parts
    }
    err = (formats.dequantize(parts, bits, group) - w).abs()
    if bits == 8:
        bound = parts["scale"].unsqueeze(-1) / 2
    else:
        bound = parts["scale"].repeat_interleave(group, dim=-1) / 2
    assert (err <= bound * (1 + 1e-4) + 1e-7).all()
    # Not a trivial bound: the steps are small against the weights.
    assert bound.max() < w.abs().max() / (10 if bits == 4 else 100)


def test_int4_packs_two_columns_per_byte_low_nibble_first():
    w = torch.tensor([[0.0, 15.0] * 16])  # min 0, scale 1: q equals w
    parts = formats.quantize(w, 4, 32)
    assert parts["qweight"].shape == (1, 16)
    assert (parts["qweight"] == 0xF0).all()
    assert torch.equal(formats.unpack_int4(parts["qweight"])[0], w[0].to(torch.uint8))


@pytest.mark.parametrize("kernel", ["dequant", "torch"])
@pytest.mark.parametrize(("bits", "group"), SETTINGS)
@pytest.mark.parametrize("rows", [1, 5])
def test_kernels_match_dequantise_then_matmul(kernel, bits, group, rows):
    w = QuantWeight.from_float(torch.randn(4, 48, 128), bits, group)
    w.kernel = kernel
    x = torch.randn(rows, 128)
    for e in (0, 3):
        expected = x @ w.dequantize(e).T
        torch.testing.assert_close(w.matmul(x, e), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "group"), SETTINGS)
def test_quant_linear_keeps_leading_dims_and_bias(bits, group):
    lin = torch.nn.Linear(64, 32, bias=True)
    q = QuantLinear.from_linear(lin, bits, group)
    x = torch.randn(2, 3, 64)
    expected = F.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    assert q(x).shape == (2, 3, 32)


@pytest.mark.parametrize("kernel", ["dequant", "torch"])
@pytest.mark.parametrize(("bits", "group"), SETTINGS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_quantized_experts_match_eager_on_the_dequantised_weights(kernel, bits, group, activation):
    E, D, F_, T, K = 6, 64, 128, 20, 2
    ex = Experts(E, D, F_, activation)
    ex.init_weights(0.3, 0.3)
    q = QuantExperts.like(ex, bits, group)
    for name in ("w_gate", "w_up", "w_down"):
        if getattr(q, name) is not None:
            getattr(q, name).kernel = kernel
    oracle = q.dequantized()
    x = torch.randn(T, D)
    allowed = torch.tensor([0, 1, 2, 4, 5])  # expert 3 gets no token
    experts = torch.stack([allowed[torch.randperm(5)[:K]] for _ in range(T)])
    weights = torch.rand(T, K)

    def run(backend, module):
        p = dispatch.plan(experts, weights, E, sort=backend.needs_sorted)
        y = backend.fn(dispatch.permute(x, p), p.expert_S, p.tokens_per_expert, p.weight_S, module)
        return dispatch.combine(y, p, T)

    expected = run(BACKENDS["eager"], oracle).detach()
    with torch.no_grad():
        # float32 rounding only: the routing weight and int8's channel scale are applied at
        # a different point of the product than the oracle applies them
        tol = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(run(BACKEND, q), expected, rtol=1e-4, atol=tol)
    # and the quantisation is visible against the float experts it came from
    assert not torch.allclose(run(BACKENDS["eager"], ex).detach(), expected.detach(), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 20])
def test_a_large_weight_is_expanded_in_blocks_with_the_same_product(monkeypatch, bits, rows):
    """Above DEQUANT_CHUNK elements the weight is expanded a block of output rows at a time
    (the last block shorter): the product equals dequantise-then-matmul."""
    from moekit.quant import weight as weight_module

    w = torch.randn(200, 64)
    q = QuantWeight.from_float(w, bits, 32 if bits == 4 else None)
    q.kernel = "dequant"
    x = torch.randn(rows, 64)
    want = x @ q.dequantize().T
    monkeypatch.setattr(weight_module, "DEQUANT_CHUNK", 48 * 64)  # blocks of 48 rows
    expanded = []
    original = weight_module.formats.dequantize

    def counting(parts, *args, **kwargs):
        expanded.append(parts["qweight"].shape[0])
        return original(parts, *args, **kwargs)

    monkeypatch.setattr(weight_module.formats, "dequantize", counting)
    got = q.matmul(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if bits == 4:
        assert expanded == [48, 48, 48, 48, 8]  # never the whole weight at once


@pytest.mark.parametrize("avx512", [True, False])
def test_auto_takes_torchs_kernels_only_for_bfloat16_on_avx512(monkeypatch, avx512):
    # PyTorch's weight-only CPU kernels are vectorised for bfloat16 inputs on AVX-512 only;
    # for float32 and float16 they cost milliseconds per row (docs/benchmarks.md).
    from moekit.quant import weight

    monkeypatch.setattr(weight, "cpu_has_avx512", lambda: avx512)
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16):
        assert weight.auto_kernel(cpu, 4, dtype) == "compiled"
        assert weight.auto_kernel(cpu, 8, dtype) == "dequant"
    want = "torch" if avx512 else None
    assert weight.auto_kernel(cpu, 4, torch.bfloat16) == (want or "compiled")
    assert weight.auto_kernel(cpu, 8, torch.bfloat16) == (want or "dequant")
    assert weight.auto_kernel(torch.device("meta"), 4) == "dequant"  # not the CPU


def test_auto_float32_products_on_avx512_never_reach_torchs_kernels(monkeypatch):
    from moekit.quant import weight

    def refuse(*args):
        raise AssertionError("PyTorch's weight-only kernel was called for these inputs")

    monkeypatch.setattr(weight, "cpu_has_avx512", lambda: True)
    monkeypatch.setattr(QuantWeight, "_torch_matmul", refuse)
    torch.manual_seed(0)
    w = torch.randn(2, 32, 64)
    for bits, group in SETTINGS:
        qw = QuantWeight.from_float(w, bits, group)
        x = torch.randn(3, 64)
        want = x @ qw.dequantize(1).T
        torch.testing.assert_close(qw.matmul(x, 1), want, rtol=1e-4, atol=1e-4)
    # bfloat16 where PyTorch's int4 kernel cannot take the weight (24 output rows, not a
    # multiple of 16): auto falls back to its choice for other inputs, not to "torch".
    qw = QuantWeight.from_float(torch.randn(24, 64), 4, 32)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    want = x.float() @ qw.dequantize().T
    torch.testing.assert_close(qw.matmul(x).float(), want, rtol=2e-2, atol=2e-2)
