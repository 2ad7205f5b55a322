"""Rotary position embedding (RoPE), half-rotation layout (the Hugging Face Llama convention),
optionally scaled to a longer context with YaRN (`moekit.config.RopeScalingConfig`).

The rotation tables are computed from positions on the fly: there is no cached buffer to
rebuild after meta-device initialisation or to outgrow at long context.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from moekit.config import RopeScalingConfig

# What the inverse frequencies depend on besides the dimension, base and device: None for
# plain RoPE, else YaRN's (factor, original context, beta_fast, beta_slow, truncate).
_Yarn = tuple[float, int, float, float, bool] | None


def _yarn_key(scaling: RopeScalingConfig | None) -> _Yarn:
    if scaling is None:
        return None
    s = scaling
    return (float(s.factor), s.original_max_seq_len, s.beta_fast, s.beta_slow, s.truncate)


def _yarn_inv_freq(base_freq: Tensor, dim: int, theta: float, yarn: tuple) -> Tensor:
    """YaRN: the slow dimensions' frequencies divided by `factor`, the fast ones kept, blended
    by a linear ramp between the dimensions that turn `beta_slow` and `beta_fast` times over
    the original context."""
    factor, original, beta_fast, beta_slow, truncate = yarn

    def dim_turning(turns: float) -> float:  # the dimension that turns `turns` times
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = torch.arange(dim // 2, dtype=torch.float32, device=base_freq.device)
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)  # 0: fast (kept), 1: slow (stretched)
    kept_share = 1 - ramp  # in this order, the float32 rounding of transformers' tables
    return 1.0 / (factor * base_freq) * (1 - kept_share) + 1.0 / base_freq * kept_share


@functools.lru_cache(maxsize=32)
def _inv_freq(dim: int, theta: float, device: torch.device, yarn: _Yarn = None) -> Tensor:
    # Cached across calls: never an inference-mode tensor, which training could not use.
    with torch.inference_mode(False):
        base_freq = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        if yarn is None:
            return 1.0 / base_freq
        return _yarn_inv_freq(base_freq, dim, theta, yarn)


def rope_tables(
    positions: Tensor,
    dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScalingConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape positions.shape + (dim,) for rotary dimension `dim`, scaled
    by `scaling` when given (YaRN's frequencies, and its attention factor on both tables)."""
    inv_freq = _inv_freq(dim, theta, positions.device, _yarn_key(scaling))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling is not None:
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
