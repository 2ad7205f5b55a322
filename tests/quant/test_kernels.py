"""The compiled int4 kernels against dequantise-then-matmul, in each row regime, and the
eager fallback when compiling fails. Tiny shapes: each compilation takes seconds."""

import logging

import pytest
import torch

from moekit.quant import kernels
from moekit.quant.weight import QuantWeight

# float32 rounding only: the compiled sum runs in another order and with fused multiply-adds
TOL = {"rtol": 1e-4, "atol": 1e-4}


def test_compiled_kernel_matches_dequantise_then_matmul_in_every_row_regime():
    torch.manual_seed(0)
    w = QuantWeight.from_float(torch.randn(3, 48, 128), 4, 32)
    w.kernel = "compiled"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows in (1, 5, 3, 12, 20):  # one row; few rows (dynamic); more rows (dynamic)
        x = torch.randn(rows, 128)
        for e in (0, 2):
            expected = x @ w.dequantize(e).T
            torch.testing.assert_close(w.matmul(x, e), expected, **TOL)
    # one kernel per regime, reused across experts and row counts (one row is compiled
    # without dynamo; the two dynamic-row kernels are one dynamo graph each)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    assert {k[0] for k in kernels._compiled if k[1:3] == (48, 128)} == {"1", "few", "many"}


def test_compile_failure_logs_once_and_falls_back_to_dequant(caplog):
    torch.manual_seed(1)
    w = QuantWeight.from_float(torch.randn(40, 64), 4, 32)  # a shape no other test compiles
    w.kernel = "compiled"
    x = torch.randn(1, 64)
    with (
        caplog.at_level(logging.WARNING, logger="moekit"),
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}),
    ):
        for _ in range(3):
            torch.testing.assert_close(w.matmul(x), x @ w.dequantize().T, **TOL)
    failures = [r for r in caplog.records if "compiling the int4 kernel" in r.getMessage()]
    assert len(failures) == 1
    assert "[40, 64]" in failures[0].getMessage()


@pytest.mark.parametrize(("x", "group"), [(torch.randn(2, 64), 12), (torch.randn(0, 64), 32)])
def test_shapes_the_compiled_kernel_cannot_take_use_dequant(x, group):
    if group == 12:
        w = QuantWeight.from_float(torch.randn(16, 48), 4, group)  # groups of 12: not whole words
        x = x[:, :48]
    else:
        w = QuantWeight.from_float(torch.randn(16, 64), 4, group)
    w.kernel = "compiled"
    assert not kernels.fits(x, w.shape, w.group)
    torch.testing.assert_close(w.matmul(x), x @ w.dequantize().T, **TOL)


def test_a_product_that_needs_its_gradient_takes_the_eager_path():
    w = QuantWeight.from_float(torch.randn(16, 64), 4, 32)
    w.kernel = "compiled"
    x = torch.randn(2, 64, requires_grad=True)
    assert not kernels.fits(x, w.shape, w.group)
    w.matmul(x).sum().backward()
    torch.testing.assert_close(x.grad, w.dequantize().sum(0).expand(2, 64), **TOL)
    with torch.no_grad():
        assert kernels.fits(x, w.shape, w.group)


def test_under_a_dispatch_mode_the_eager_path_runs_and_the_kernel_is_not_given_up(caplog):
    from moekit.bench.generate import count_calls

    torch.manual_seed(2)
    w = QuantWeight.from_float(torch.randn(24, 64), 4, 32)  # a shape no other test compiles
    w.kernel = "compiled"
    x = torch.randn(12, 64)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        # An operator counter sees the eager product's operators (dequantise, then matmul).
        assert count_calls(lambda: w.matmul(x)) > 1
        torch.testing.assert_close(w.matmul(x), x @ w.dequantize().T, **TOL)
    assert not [r for r in caplog.records if "compiling the int4 kernel" in r.getMessage()]
    assert ("many", 24, 64, 32, torch.float32) in kernels._compiled  # compiled after the mode
    assert not kernels._failed.keys() & {("many", 24, 64, 32, torch.float32)}
