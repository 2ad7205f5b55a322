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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.nn.static_kernel import StaticKernels, layout

# product(x (T, 1 or K, Din), weight parts..., experts (T, K)) -> (T, K, Dout)
Product = Callable[..., Tensor]


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
