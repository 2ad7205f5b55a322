"""One token through its chosen SwiGLU experts as one compiled kernel (the decode case).

Shape legend: K chosen experts, E experts (or cache slots), F expert hidden dim, D model dim.

Eagerly, a token's K experts cost a gate-and-up product, an activation and a down product
each, then a weighted sum: 4K + 2 PyTorch calls whose fixed cost dwarfs their arithmetic at
fine-grained shapes (64 experts of hidden 128: 8 experts' weights are 1.5 MiB). Here the
expert index is read inside generated loops (`moekit.nn.static_kernel`, compiled once per
shape), so only the chosen experts' weights are read and the step is one call. A slot of -1
(fewer experts than the router's maximum for this token) contributes nothing.

`swiglu_experts` takes float weights; quantised stores build an `ExpertsKernel` over their own
`product` (`moekit.quant.kernels.int4_product`, `int8_product`). Inference only: the caller
runs without autograd.

Large float experts on AVX-512 CPUs are the exception (`library_reads`): where one expert's
weights are megabytes, reading them is the whole cost, and there the library's matrix products
(MKL) read them faster than a generated reduction (measured in docs/benchmarks.md, "Large
weights through the library's products"). `grouped_swiglu` computes them so, one product per
projection per chosen expert, and is also an operator (`torch.ops.moekit.grouped_swiglu`)
that a compiled graph calls as it is. Where the native kernels of `moekit.moe.native` are
built, a decode step's tokens take the native streaming kernel instead (faster still).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.moe import native
from moekit.nn.static_kernel import StaticKernels, layout
from moekit.runtime import cpu_has_avx512

# product(x (T, 1 or K, Din), weight parts..., experts (T, K)) -> (T, K, Dout)
Product = Callable[..., Tensor]

# Weights of at least this many elements (4 MiB in float32: one projection of one expert,
# or a dense projection) are multiplied by the library on AVX-512 CPUs rather than by a
# generated reduction (`library_reads`). Below it the reduction wins: its fixed cost is lower
# and it fuses with its neighbours (measured on the demo model, whose largest weight has 786k
# elements).
LIBRARY_MIN_ELEMENTS = 2**20
# Whether this CPU is of the kind where that was measured (read once: `library_reads` runs
# inside compiled graphs, where a cached function call would break the graph).
LIBRARY_CPU = cpu_has_avx512()


def library_reads(w: Tensor) -> bool:
    """Whether a decode-time product with weight `w` (one expert's, or a dense projection's)
    should go to the library's matrix product rather than a generated reduction: for
    weights of `LIBRARY_MIN_ELEMENTS` or more on CPUs of the kind where it was measured
    faster. Measured on two: an AVX-512 Xeon, where MKL read such weights 1.2-1.5x faster than
    the reductions, and an AVX2 EPYC, where the reductions were 1.1x faster over a whole step;
    the rule follows them (AVX-512: the library; otherwise the reductions)."""
    return w.device.type == "cpu" and w.numel() >= LIBRARY_MIN_ELEMENTS and LIBRARY_CPU


def grouped_rows(
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    one: Callable[[Tensor, int], Tensor],
    scale_input: bool = False,
) -> Tensor:
    """Each token's chosen experts, weighted and summed, (T, D): the copies grouped by expert
    so that each chosen expert's weights are read once, `one(x_ND, e)` computing expert e on
    its rows. -1 marks an empty slot. With `scale_input`, the routing weight scales the
    expert's input instead of its output (Llama 4)."""
    T, K = experts_TK.shape
    rows = experts_TK.tolist()
    w_TK = weights_TK.to(x_TD.dtype)
    if T == 1 and not scale_input:
        slots = [k for k, e in enumerate(rows[0]) if e >= 0]
        if not slots:
            return torch.zeros_like(x_TD)
        y_KD = torch.cat([one(x_TD, rows[0][k]) for k in slots])
        w_1K = w_TK if len(slots) == K else w_TK[:, slots]
        return w_1K @ y_KD
    by_expert: dict[int, list[int]] = {}
    for t, row in enumerate(rows):
        for k, e in enumerate(row):
            if e >= 0:
                by_expert.setdefault(e, []).append(t * K + k)
    if not by_expert:
        return torch.zeros_like(x_TD)
    order = [s for e in sorted(by_expert) for s in by_expert[e]]
    index = torch.tensor([order, [s // K for s in order]], device=x_TD.device)
    x_SD = x_TD.index_select(0, index[1])
    w_S1 = w_TK.reshape(-1).index_select(0, index[0]).unsqueeze(1)
    if scale_input:
        x_SD = x_SD * w_S1
    outs, start = [], 0
    for e in sorted(by_expert):
        n = len(by_expert[e])
        outs.append(one(x_SD[start : start + n], e))
        start += n
    y_SD = torch.cat(outs)
    if not scale_input:
        y_SD = y_SD * w_S1
    return y_SD.new_zeros(T, x_TD.shape[1]).index_add_(0, index[1], y_SD)


@torch.library.custom_op("moekit::grouped_swiglu", mutates_args=())
def grouped_swiglu(
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    gate_up_E2FD: Tensor,
    down_EDF: Tensor,
    scale_input: bool,
) -> Tensor:
    """SwiGLU experts through the library's products (`grouped_rows`): gate and up as one
    product over each expert's fused rows (E, 2F, D), then its down projection (E, D, F).
    Inference only. An operator, so that a compiled graph calls it unchanged (its products
    read the chosen experts' weights where they lie; traced, the index would gather them).
    A decode step's few float32 tokens go to the native streaming kernel where it is built
    (`moekit.moe.native`)."""
    if native.load() and native.takes(x_TD, gate_up_E2FD, down_EDF):
        weights = gate_up_E2FD, down_EDF
        return native.grouped_swiglu(x_TD, experts_TK, weights_TK, *weights, scale_input)
    hidden = down_EDF.shape[-1]

    def one(x_ND: Tensor, e: int) -> Tensor:
        gate, up = F.linear(x_ND, gate_up_E2FD[e]).split(hidden, dim=-1)
        return F.linear(F.silu(gate) * up, down_EDF[e])

    return grouped_rows(x_TD, experts_TK, weights_TK, one, scale_input)


@grouped_swiglu.register_fake
def _grouped_swiglu_shape(x_TD: Tensor, *rest: object) -> Tensor:
    """The operator's output as a compiler sees it: the shape and dtype of its input."""
    return x_TD.new_empty(x_TD.shape)


def float_product(x_PK: Tensor, w_ENK: Tensor, experts_TK: Tensor) -> Tensor:
    """`x @ w[e]^T` for each token's chosen experts e: x (T, 1, Din) or (T, K, Din) ->
    (T, K, N), summed in float32 (as a matmul accumulates half-precision inputs)."""
    x_PK1D = x_PK[:, :, None, :]
    return (x_PK1D * w_ENK[experts_TK]).sum(-1, dtype=torch.float32).to(x_PK.dtype)


def swiglu_sum(
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    gate: tuple[Tensor, ...],
    up: tuple[Tensor, ...],
    down: tuple[Tensor, ...],
    product: Product,
) -> Tensor:
    """Each token's chosen SwiGLU experts, weighted and summed: (T, D), written for a
    compiler (this kernel, and the compiled decode step, moekit.infer.compiled). `gate`, `up`,
    `down`: each projection's stacked tensors as `product` takes them."""
    chosen_TK = experts_TK.clamp(min=0)
    w_TK = torch.where(experts_TK >= 0, weights_TK.to(x_TD.dtype), 0.0)
    x_T1D = x_TD[:, None, :]
    h_TKF = F.silu(product(x_T1D, *gate, chosen_TK)) * product(x_T1D, *up, chosen_TK)
    y_TKD = product(h_TKF, *down, chosen_TK)
    return (w_TK[:, :, None] * y_TKD).sum(1)


class ExpertsKernel:
    """`__call__(x_1D, experts_1K, weights_1K, gate, up, down)`: the routed experts' weighted
    sum for one token, (1, D), or None when it should run eagerly (see
    `moekit.nn.static_kernel`). `gate`, `up`, `down`: each projection's stacked tensors, as
    `product` takes them."""

    def __init__(self, product: Product, what: str, options: dict[str, Any] | None = None):
        def fn(x: Tensor, e: Tensor, w: Tensor, *parts: Tensor) -> Tensor:
            n = len(parts) // 3
            return swiglu_sum(x, e, w, parts[:n], parts[n : 2 * n], parts[2 * n :], product)

        self.kernels = StaticKernels(fn, what, options)

    def __call__(
        self,
        x_1D: Tensor,
        experts_1K: Tensor,
        weights_1K: Tensor,
        gate: tuple[Tensor, ...],
        up: tuple[Tensor, ...],
        down: tuple[Tensor, ...],
    ) -> Tensor | None:
        if x_1D.device.type != "cpu" or x_1D.shape[0] != 1:
            return None
        args = (x_1D.contiguous(), experts_1K, weights_1K, *gate, *up, *down)
        return self.kernels.run(layout(*args), *args)


swiglu_experts = ExpertsKernel(float_product, "the one-token experts kernel")
