"""Weight-only quantisation formats: int8 per output channel and int4 in groups of columns.

Shape legend: N output features, K input features, G group size; a stacked expert weight has
a leading E (experts) before N and K.

A float weight called NAME (`[..., N, K]`) is stored as:

- `NAME.qweight`: int8 `[..., N, K]` (8 bits), or uint8 `[..., N, K/2]` (4 bits: column 2i in
  the low nibble of byte i, column 2i+1 in the high nibble);
- `NAME.scale`: float32 `[..., N]` (8 bits) or `[..., N, K/G]` (4 bits);
- `NAME.min`: float32 `[..., N, K/G]` (4 bits only).

8 bits: `w = scale * q` with q in -127..127 (symmetric, per output channel).
4 bits: `w = min + scale * q` with q in 0..15 (asymmetric, per group of G input columns).
"""

from __future__ import annotations

import torch
from torch import Tensor

QWEIGHT, SCALE, MIN = "qweight", "scale", "min"


def stored_parts(bits: int) -> tuple[str, ...]:
    """The names of the tensors one quantised weight is stored as (after `NAME.`)."""
    return (QWEIGHT, SCALE, MIN) if bits == 4 else (QWEIGHT, SCALE)


def stored_shapes(shape: tuple[int, ...], bits: int, group: int | None) -> dict[str, tuple]:
    """The shapes of the stored tensors of a float weight of `shape` ([..., N, K])."""
    *lead, n, k = shape
    if bits == 8:
        return {QWEIGHT: (*lead, n, k), SCALE: (*lead, n)}
    assert group is not None
    groups = (*lead, n, k // group)
    return {QWEIGHT: (*lead, n, k // 2), SCALE: groups, MIN: groups}


def stored_dtypes(bits: int) -> dict[str, torch.dtype]:
    q = torch.int8 if bits == 8 else torch.uint8
    return {QWEIGHT: q, SCALE: torch.float32, MIN: torch.float32}


def check_divides(name: str, shape: tuple[int, ...], bits: int, group: int | None) -> None:
    """ValueError naming the tensor when `group` does not divide its input dimension."""
    if bits == 4 and group is not None and shape[-1] % group:
        raise ValueError(
            f"group size {group} does not divide the input dimension {shape[-1]} of tensor "
            f"{name!r} (shape {tuple(shape)}); choose a group size that divides it"
        )


def quantize(w: Tensor, bits: int, group: int | None) -> dict[str, Tensor]:
    """The stored tensors of float weight `w` ([..., N, K]), computed in float32 one leading
    slice at a time (a stacked expert weight never needs a second float copy of itself)."""
    if w.dim() > 2:
        parts = [quantize(w_i, bits, group) for w_i in w.unbind(0)]
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    w = w.detach().to(torch.float32)
    if bits == 8:
        scale_N = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q_NK = torch.round(w / scale_N[:, None]).clamp_(-127, 127).to(torch.int8)
        return {QWEIGHT: q_NK, SCALE: scale_N}
    assert group is not None
    n, k = w.shape
    w_NgG = w.reshape(n, k // group, group)
    lo_Ng, hi_Ng = w_NgG.amin(dim=2), w_NgG.amax(dim=2)
    scale_Ng = ((hi_Ng - lo_Ng) / 15.0).clamp(min=1e-12)
    q = torch.round((w_NgG - lo_Ng[..., None]) / scale_Ng[..., None]).clamp_(0, 15)
    q_NK = q.to(torch.uint8).reshape(n, k)
    packed = q_NK[:, 0::2] | (q_NK[:, 1::2] << 4)
    return {QWEIGHT: packed, SCALE: scale_Ng, MIN: lo_Ng}


def unpack_int4(packed: Tensor) -> Tensor:
    """The 4-bit values (uint8, 0..15) of packed weights `[..., N, K/2]`: `[..., N, K]`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize(
    parts: dict[str, Tensor], bits: int, group: int | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The float weight stored as `parts` (the inverse of `quantize`, up to rounding)."""
    q, scale = parts[QWEIGHT], parts[SCALE]
    if bits == 8:
        return q.to(dtype) * scale.to(dtype).unsqueeze(-1)
    assert group is not None
    q_NK = unpack_int4(q).to(dtype)
    *lead, n, k = q_NK.shape
    q_NgG = q_NK.view(*lead, n, k // group, group)
    lo = parts[MIN].to(dtype).unsqueeze(-1)
    return torch.addcmul(lo, q_NgG, scale.to(dtype).unsqueeze(-1)).view(*lead, n, k)
