"""Rotary position embedding (RoPE), half-rotation layout (the Hugging Face Llama convention),
optionally scaled to a longer context (`moekit.config.RopeScalingConfig`: YaRN, linear or
Llama 3 scaling, with the same arithmetic as transformers').

The rotation tables are computed from positions on the fly: there is no cached buffer to
rebuild after meta-device initialisation or to outgrow at long context.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from moekit.config import RopeScalingConfig


def _yarn(base_freq: Tensor, dim: int, theta: float, s: RopeScalingConfig) -> Tensor:
    """YaRN: the slow dimensions' frequencies divided by `factor`, the fast ones kept, blended
    by a linear ramp between the dimensions that turn `beta_slow` and `beta_fast` times over
    the original context."""
    original = s.original_max_seq_len
    assert original is not None  # validated

    def dim_turning(turns: float) -> float:  # the dimension that turns `turns` times
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(s.beta_fast), dim_turning(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = torch.arange(dim // 2, dtype=torch.float32, device=base_freq.device)
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)  # 0: fast (kept), 1: slow (stretched)
    kept_share = 1 - ramp
    # In this order, the float32 rounding of transformers' tables.
    return 1.0 / (s.factor * base_freq) * (1 - kept_share) + 1.0 / base_freq * kept_share


def _llama3(inv_freq: Tensor, s: RopeScalingConfig) -> Tensor:
    """Llama 3: wavelengths shorter than original / high_freq_factor kept, longer than
    original / low_freq_factor divided by `factor`, the ones between blended smoothly."""
    assert s.original_max_seq_len is not None and s.low_freq_factor and s.high_freq_factor
    original, low, high = s.original_max_seq_len, s.low_freq_factor, s.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(between, blended, scaled)


@functools.lru_cache(maxsize=32)
def _inv_freq(
    dim: int, theta: float, device: torch.device, scaling: tuple[tuple[str, Any], ...] = ()
) -> Tensor:
    # Cached across calls: never an inference-mode tensor, which training could not use.
    with torch.inference_mode(False):
        base_freq = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        if not scaling:
            return 1.0 / base_freq
        s = RopeScalingConfig.from_dict(dict(scaling))
        if s.kind == "yarn":
            return _yarn(base_freq, dim, theta, s)
        inv_freq = 1.0 / base_freq
        if s.kind == "linear":
            return inv_freq / s.factor
        return _llama3(inv_freq, s)


def inverse_frequencies(
    dim: int, theta: float, device: torch.device, scaling: RopeScalingConfig | None = None
) -> Tensor:
    """The (dim/2,) rotation frequencies of RoPE with base `theta`, scaled by `scaling`."""
    return _inv_freq(dim, theta, device, () if scaling is None else scaling.key())


def rope_tables(
    positions: Tensor,
    dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScalingConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape positions.shape + (dim,) for rotary dimension `dim`, scaled
    by `scaling` when given (its frequencies, and YaRN's attention factor on both tables)."""
    inv_freq = inverse_frequencies(dim, theta, positions.device, scaling)
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling is not None and scaling.cos_sin_factor() != 1.0:
        factor = scaling.cos_sin_factor()
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def per_head(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Tables of shape (B, S, dim) or (S, dim) made (B or 1, S, 1, dim), to broadcast over
    heads; a model makes them once per forward pass instead of once per rotation."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return cos.unsqueeze(2), sin.unsqueeze(2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` of shape (B, S, H, dim) with tables of shape (B, S, dim) or (S, dim), or
    tables already shaped by `per_head`."""
    if cos.dim() != 4:
        cos, sin = per_head(cos, sin)
    return x * cos + rotate_half(x) * sin
