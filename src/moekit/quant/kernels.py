"""Compiled int4 kernels: `torch.compile` (inductor, C++ on CPU) of small functions that read
the stored nibbles directly.

Shape legend: M rows, N output features, K input features, G group size, W = K/8 (32-bit
words of eight 4-bit columns).

The stored int4 layout (see `formats`: column 2i in the low nibble of byte i) read as
little-endian 32-bit words puts column 8w+c at bits 4c..4c+3 of word w, so `x` viewed as
[M, W, 8] lines up with the words without any reordering. Two kernels:

- `fused` (few rows, M <= FEW_ROWS): out[m, n] = sum_k x[m, k] * (min + scale * q)[n, k] in one
  vectorised loop per output that loads each packed word once, shifts out its eight nibbles
  and never writes a float weight. Its cost grows with M (the weight is unpacked once per row),
  so it pays only for few rows.
- `dequant_mm` (more rows): one compiled pass that unpacks the weight to float, then the float
  matmul, so the unpacking is paid once for all rows.

Each kernel is compiled once per (N, K, G, dtype, row regime): one row (decoding) is its own
static shape, traced and compiled without dynamo, whose per-call guard checks would cost
several times the rest of the call; 2..FEW_ROWS rows share one kernel compiled by
`torch.compile` for a dynamic M, and so do larger row counts. Compiled code is cached on
disk by inductor, so later processes load it instead of compiling again.

Inductor's C++ is built with floating-point contraction and reassociation allowed
(fused multiply-adds and a reordered sum), which changes results only by float32 rounding.
When compiling fails (no C++ compiler, an unsupported platform), `compiled_matmul` returns
None after logging the reason once on the `moekit` logger, and the caller uses its eager path;
so it does, without logging, under a Python dispatch mode (where compiled code cannot run).
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moekit.nn.static_kernel import compile_static, unavailable

log = logging.getLogger("moekit")

FEW_ROWS = 8  # the fused kernel's regime: 1..FEW_ROWS rows
# Inductor options for these kernels only: fused multiply-adds and a reassociated sum.
OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "cpp.enable_floating_point_contract_flag": "fast",
    "cpp.enable_unsafe_math_opt_flag": True,
}
_DTYPES = (torch.float32, torch.bfloat16, torch.half)

_Kernel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
_compiled: dict[tuple, _Kernel] = {}
_failed: dict[tuple, str] = {}
_lock = threading.Lock()


def _fused(x_MK: Tensor, q_NW: Tensor, scale_Ng: Tensor, min_Ng: Tensor) -> Tensor:
    return int4_product(x_MK, q_NW, scale_Ng, min_Ng)


def _dequant_mm(x_MK: Tensor, q_NW: Tensor, scale_Ng: Tensor, min_Ng: Tensor) -> Tensor:
    N, g = scale_Ng.shape
    shifts = torch.arange(8, dtype=torch.int32, device=x_MK.device) * 4
    nib = ((q_NW.view(N, g, -1, 1) >> shifts) & 15).to(x_MK.dtype)
    w_NK = (
        min_Ng.view(N, g, 1, 1).to(x_MK.dtype) + scale_Ng.view(N, g, 1, 1).to(x_MK.dtype) * nib
    ).view(N, -1)
    return x_MK @ w_NK.t()


def fits(x_MK: Tensor, shape: tuple[int, ...], group: int | None) -> bool:
    """Whether the compiled kernels can compute `x_MK @ w^T` for an int4 weight of `shape`
    ([..., N, K]) in groups of `group`: CPU, a float dtype, whole words per group, and no
    gradient wanted (they are inference kernels; a product that needs its gradient takes the
    eager path, which autograd follows)."""
    return (
        x_MK.device.type == "cpu"
        and x_MK.shape[0] > 0
        and not (x_MK.requires_grad and torch.is_grad_enabled())
        and x_MK.dtype in _DTYPES
        and group is not None
        and group % 8 == 0
        and shape[-1] % group == 0
    )


def regime(rows: int) -> str:
    """The row regime a product of `rows` rows belongs to: "1", "few" or "many"."""
    return "1" if rows == 1 else "few" if rows <= FEW_ROWS else "many"


def _build(key: tuple, example: tuple[Tensor, ...]) -> _Kernel:
    kind = key[0]
    fn = _fused if kind != "many" else _dequant_mm
    if kind == "1":
        # One row, the decode case: compiled without dynamo's guards, whose per-call cost
        # (about 4x this path's) would rival the product itself. The caller's key pins every
        # shape, dtype and stride the compiled code assumes. (Traced on fake tensors: a real
        # trace would expand the float weight once, three times the float32 bytes of an
        # output head over a large vocabulary.)
        return compile_static(fn, example, OPTIONS)
    # A fresh code object per key: each shape gets its own compiled entry instead of sharing
    # one (and its recompile limit) with every other shape.
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, f"{fn.__name__}_{kind}")
    compiled: _Kernel = torch.compile(own, dynamic=False, fullgraph=True, options=OPTIONS)
    return compiled


def compiled_matmul(
    x_MK: Tensor, packed_NKh: Tensor, scale_Ng: Tensor, min_Ng: Tensor, group: int
) -> Tensor | None:
    """`x_MK @ w^T` for the int4 weight stored as `packed_NKh` (uint8, two columns a byte),
    `scale_Ng` and `min_Ng` (groups of `group` columns), computed by a compiled kernel (see
    the module docstring); None when the kernel for this shape could not be compiled (logged
    once). The caller checks `fits` first."""
    rows = x_MK.shape[0]
    kind = regime(rows)
    if torch.compiler.is_compiling():  # inside a compiled caller: let it trace the math
        math: _Kernel = _fused if kind != "many" else _dequant_mm
        return math(x_MK, packed_NKh.view(torch.int32), scale_Ng, min_Ng)
    if unavailable():
        # Under a Python dispatch mode (an operator counter, a fake-tensor trace) the compiled
        # code cannot run (dynamo declines the frame): the eager path is what the mode sees.
        # Not a failure: the kernel is used again once the mode is gone.
        return None
    n, kh = packed_NKh.shape
    key = (kind, n, kh * 2, group, x_MK.dtype)
    if key in _failed:
        return None
    q_NW = packed_NKh.contiguous().view(torch.int32)
    args = (x_MK.contiguous(), q_NW, scale_Ng.contiguous(), min_Ng.contiguous())
    if kind != "1":
        torch._dynamo.mark_dynamic(args[0], 0)
    try:
        with _lock:
            if key not in _compiled:
                _compiled[key] = _build(key, args)
        return _compiled[key](*args)
    except Exception as exc:  # compilation failures come as many exception types
        _failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning(
            "compiling the int4 kernel for %s rows of a [%d, %d] weight failed (%s); "
            "using the eager dequantise-then-matmul path for it",
            kind,
            n,
            kh * 2,
            _failed[key],
        )
        return None


# ---- the same arithmetic inside larger compiled functions ----------------------------------
# The one-token experts kernel (moekit.moe.decode_kernel) and the compiled decode step
# (moekit.infer.compiled) read packed weights inside their own generated loops.


def int4_product(
    x: Tensor, words: Tensor, scale: Tensor, lo: Tensor, experts: Tensor | None = None
) -> Tensor:
    """`x @ w^T` for the int4 weight stored as `words` (the packed bytes viewed as int32,
    [..., N, K/8]), `scale` and `lo` (the minimums, [..., N, K/G]), written for a compiler to
    fuse: (..., N) for x (..., K). With `experts` (T, K) the weights are stacked over experts
    and each token and choice reads expert experts[t, k]: x (T, 1, Kin) or (T, K, Kin) ->
    (T, K, N); the index sits inside the reduction, so only the chosen experts' bytes are
    read, and no float weight is written."""
    if experts is not None:
        words, scale, lo = words[experts], scale[experts], lo[experts]
    *lead, n, g = scale.shape
    shifts = torch.arange(8, dtype=torch.int32, device=words.device) * 4
    nib = ((words.view(*lead, n, g, -1, 1) >> shifts) & 15).to(x.dtype)
    w_g8 = lo.to(x.dtype)[..., None, None] + scale.to(x.dtype)[..., None, None] * nib
    x_g8 = x.view(*x.shape[:-1], 1, g, -1, 8)
    return (x_g8 * w_g8).sum((-1, -2, -3), dtype=torch.float32).to(x.dtype)


def int8_product(x: Tensor, q: Tensor, scale: Tensor, experts: Tensor | None = None) -> Tensor:
    """`int4_product` for an int8 weight `q` [..., N, K] with a scale per output channel
    [..., N] (applied after the product)."""
    if experts is not None:
        q, scale = q[experts], scale[experts]
    out = (x[..., None, :] * q.to(x.dtype)).sum(-1, dtype=torch.float32).to(x.dtype)
    return out * scale.to(x.dtype)
