"""Rotary position embedding (RoPE), half-rotation layout (the Hugging Face Llama convention).

The rotation tables are computed from positions on the fly: there is no cached buffer to
rebuild after meta-device initialisation or to outgrow at long context.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=32)
def _inv_freq(dim: int, theta: float, device: torch.device) -> Tensor:
    # Cached across calls: never an inference-mode tensor, which training could not use.
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rope_tables(
    positions: Tensor, dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape positions.shape + (dim,) for rotary dimension `dim`."""
    inv_freq = _inv_freq(dim, theta, positions.device)
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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
