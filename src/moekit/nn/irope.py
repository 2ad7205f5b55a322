"""Interleaved RoPE / NoPE attention (`moekit.config.IRoPEConfig`, Llama 4).

`IRoPEAttention` is grouped-query attention that knows its layer: a RoPE layer rotates its
queries and keys (then, with `qk_l2_norm`, normalises them) and, with a chunk size, attends
only within its chunk; a NoPE layer does not rotate and, with temperature tuning, scales its
queries by position. What depends on the positions of one forward pass (the chunked mask, the
query temperatures) is made once per pass by `irope_inputs` and shared by the layers.
Shapes: (B, S, H, hd) as in `moekit.nn.attention`; L cached positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.irope import IRoPEConfig
from moekit.nn.attention import Attention, _attend
from moekit.nn.kv_cache import KVCache
from moekit.nn.rope import apply_rope


class IRoPEInputs(NamedTuple):
    """What the layers of one forward pass share. chunk_mask: (B or 1, 1, S, L) bool, True
    where a chunked layer may attend (None without chunking). temperature: (B or 1, S) query
    scales of the NoPE layers (None without temperature tuning)."""

    chunk_mask: Tensor | None
    temperature: Tensor | None


def _causal_base(
    n: int, attn_mask: Tensor | None, cache: KVCache | None, device: torch.device
) -> Tensor:
    """(B or 1, n, L) the positions each new token may see before chunking: the caller's or
    the cache's mask, else plain causal attention over the new tokens (and what the cache
    holds before them)."""
    if attn_mask is not None:
        return attn_mask[:, 0]
    if cache is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None]
    idx = cache.end[:, None] + torch.arange(n, device=device)  # (B, n) where each is written
    keys = torch.arange(int(cache.end.max()) + n, device=device)
    return keys[None, None, :] <= idx[:, :, None]


def _key_positions(n: int, positions: Tensor, cache: KVCache | None) -> Tensor:
    """(B or 1, L) the position of each key: the count of real tokens before it."""
    if cache is None:
        return positions if positions.dim() == 2 else positions[None]
    span = int(cache.end.max()) + n
    return cache.valid[:, :span].long().cumsum(1) - 1


def irope_inputs(
    cfg: IRoPEConfig,
    positions: Tensor,
    attn_mask: Tensor | None,
    cache: KVCache | None,
) -> IRoPEInputs:
    """The chunked mask and query temperatures of one forward pass over tokens at `positions`
    ((S,) or (B, S)), with the pass's `attn_mask` (None: causal) and `cache` (after
    `KVCache.begin`)."""
    q_pos = positions if positions.dim() == 2 else positions[None]  # (B or 1, n)
    n = q_pos.shape[1]
    chunk_mask = None
    if cfg.chunk_size is not None:
        base = _causal_base(n, attn_mask, cache, q_pos.device)
        k_pos = _key_positions(n, positions, cache)
        same = (k_pos[:, None, :] // cfg.chunk_size) == (q_pos[:, :, None] // cfg.chunk_size)
        if cache is not None:  # a padding query keeps itself, so no row is empty
            idx = cache.end[:, None] + torch.arange(n, device=q_pos.device)
            keys = torch.arange(k_pos.shape[1], device=q_pos.device)
            same = same | (keys[None, None, :] == idx[:, :, None])
        chunk_mask = (base & same).unsqueeze(1)
    temperature = None
    if cfg.temperature_tuning:
        steps = torch.floor((q_pos.float() + 1.0) / cfg.floor_scale)
        temperature = torch.log1p(steps) * cfg.attn_scale + 1.0
    return IRoPEInputs(chunk_mask, temperature)


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """`x` scaled to unit root mean square over its last dimension (in float32)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class IRoPEAttention(Attention):
    """Grouped-query attention of one layer of an interleaved RoPE / NoPE model."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg)
        assert cfg.irope is not None
        self.use_rope = cfg.irope.uses_rope(layer)
        self.chunked = cfg.irope.chunked(layer)
        self.tuned = cfg.irope.temperature(layer)
        self.l2 = cfg.irope.qk_l2_norm and self.use_rope
        self.eps = cfg.norm_eps

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        shared: IRoPEInputs | None = None,
    ) -> Tensor:
        assert shared is not None, "the model passes irope_inputs"
        B, S, _ = x.shape
        q, k, v = self.project(x)  # no learned q/k norms (ModelConfig refuses them here)
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.l2:
            q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        if self.tuned:
            assert shared.temperature is not None
            q = q * shared.temperature[:, :, None, None].to(q.dtype)
        mask = shared.chunk_mask if self.chunked else attn_mask
        out = _attend(q, k, v, mask, cache, layer)  # (B, S, H, hd)
        return self.wo(out.reshape(B, S, -1))
