"""Causal self-attention: grouped-query attention and multi-head latent attention (MLA).

Both go through `torch.nn.functional.scaled_dot_product_attention`. Shapes are commented as
(B, S, H, hd): batch, positions, heads, head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.nn.fuse import Fused, plain
from moekit.nn.kv_cache import KVCache
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import apply_rope

# DeepSeek's latent RMSNorms use a fixed epsilon, independent of the model's norm_eps.
MLA_LATENT_NORM_EPS = 1e-6


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    cache: KVCache | None,
    layer: int,
    scale: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """(B, S, H, hd) queries against (B, S, Hkv, hd) keys/values -> (B, S, H, hd_v).

    With a cache, the new keys/values are appended to the layer's cached ones first, and
    `attn_mask` (from `KVCache.begin`) says which cached positions each query may see.
    `scale` multiplies the scores before the softmax (None: 1/sqrt(hd)); `sinks` (H,): each
    head's sink logit (see `_attend_with_sinks`).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cache is not None:
        k, v = cache.write(layer, k, v)
    gqa = q.shape[1] != k.shape[1]
    causal = cache is None or cache.causal_prefill
    if sinks is not None:
        out = _attend_with_sinks(q, k, v, attn_mask, causal, sinks, scale)
    elif attn_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, scale=scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=gqa, scale=scale
        )
    return out.transpose(1, 2)


# Queries per block of `_attend_with_sinks`: its scores are (B, H, block, L) float32, so a
# long prompt never holds all (S, L) of them at once.
SINK_QUERY_BLOCK = 512


def _attend_with_sinks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    causal: bool,
    sinks: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention of (B, H, S, hd) queries over (B, Hkv, L, hd) keys and values where
    each head's softmax has one more logit, `sinks[h]`, belonging to no key: its share of the
    probability is dropped, so a head can attend to nothing. `attn_mask` (True: allowed), else
    causal (the last S of L positions) or, with `causal` False, every key. -> (B, H, S, hd_v).
    Computed in blocks of `SINK_QUERY_BLOCK` queries."""
    B, H, S, _ = q.shape
    L = k.shape[2]
    if k.shape[1] != H:
        k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    if attn_mask is None and causal:
        attn_mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)
    sink = sinks.float().view(1, H, 1, 1)
    outs = []
    for start in range(0, S, SINK_QUERY_BLOCK):
        rows = slice(start, start + SINK_QUERY_BLOCK)
        q_blk = q[:, :, rows]
        factor = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (q_blk @ k.transpose(-2, -1)).float() * factor  # (B, H, s, L)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask[..., rows, :], float("-inf"))
        with_sink = torch.cat([scores, sink.expand(B, H, q_blk.shape[2], 1)], dim=-1)
        outs.append(with_sink.softmax(dim=-1)[..., :L].to(v.dtype) @ v)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k RMSNorm, optional q/k/v and output
    biases, and optional attention sinks (one learned logit per head)."""

    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    sinks: nn.Parameter | None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        H, Hkv, hd, D = self.num_heads, self.num_kv_heads, self.head_dim, cfg.dim
        self.wq = nn.Linear(D, H * hd, bias=a.qkv_bias)
        self.wk = nn.Linear(D, Hkv * hd, bias=a.qkv_bias)
        self.wv = nn.Linear(D, Hkv * hd, bias=a.qkv_bias)
        self.wo = nn.Linear(H * hd, D, bias=a.o_bias)
        self.register_parameter("sinks", nn.Parameter(torch.empty(H)) if a.sinks else None)
        self.qk_norm = a.qk_norm
        if a.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        elif a.qk_norm == "full":
            self.q_norm, self.k_norm = (
                RMSNorm(H * hd, cfg.norm_eps),
                RMSNorm(Hkv * hd, cfg.norm_eps),
            )
        else:
            self.q_norm = self.k_norm = None
        self.qkv_sizes = [H * hd, Hkv * hd, Hkv * hd]
        self._qkv, self._qkv_bias = Fused(), Fused()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v of `x`. Without autograd, one matmul over the three weights fused in
        memory (see `moekit.nn.fuse`)."""
        if torch.is_grad_enabled() or not plain(self.wq, self.wk, self.wv):
            return self.wq(x), self.wk(x), self.wv(x)
        q, k, v = self.project_fused(x).split(self.qkv_sizes, dim=-1)
        return q, k, v

    def project_fused(self, x: Tensor) -> Tensor:
        """q, k and v of `x` side by side, from their weights fused in memory."""
        lins = (self.wq, self.wk, self.wv)
        w = self._qkv.get([lin.weight for lin in lins])
        b = None
        if self.wq.bias is not None:
            b = self._qkv_bias.get([lin.bias for lin in lins if lin.bias is not None])
        return F.linear(x, w, b)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        B, S, _ = x.shape
        fusable = self.qk_norm == "none" and plain(self.wq, self.wk, self.wv)
        if fusable and not torch.is_grad_enabled():
            return self._infer(x, cos, sin, attn_mask, cache, layer)
        q, k, v = self.project(x)
        if self.qk_norm == "full":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = _attend(q, k, v, attn_mask, cache, layer, sinks=self.sinks)  # (B, S, H, hd)
        return self.wo(out.reshape(B, S, -1))

    def _infer(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        """`forward` without autograd or q/k norms, in fewer PyTorch calls: q, k and v from
        one matmul, and one rotation for the queries and keys together."""
        B, S, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.project_fused(x).view(B, S, H + 2 * Hkv, self.head_dim)
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)
        q, k = qk.split([H, Hkv], dim=2)
        v = qkv[:, :, H + Hkv :]
        out = _attend(q, k, v, attn_mask, cache, layer, sinks=self.sinks)  # (B, S, H, hd)
        return self.wo(out.reshape(B, S, -1))

    def init_weights(
        self, std: float, out_std: float, generator: torch.Generator | None = None
    ) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, mean=0.0, std=std, generator=generator)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std, generator=generator)
        if self.wo.bias is not None:
            nn.init.zeros_(self.wo.bias)
        if self.sinks is not None:  # a sink of 0 weighs as much as a key scoring 0
            nn.init.zeros_(self.sinks)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Queries: `x -> wq` or, with `q_lora_rank`, `x -> wq_a -> RMSNorm -> wq_b`; each head's
    query is a no-RoPE part and a RoPE part. Keys and values come from one compressed latent:
    `x -> wkv_a` gives the latent (`kv_lora_rank`) and a single RoPE key part shared by all
    heads; `RMSNorm(latent) -> wkv_b` gives each head's no-RoPE key part and its value.
    """

    wq: nn.Linear | None
    wq_a: nn.Linear | None
    q_norm: RMSNorm | None
    wq_b: nn.Linear | None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        D, H = cfg.dim, cfg.num_heads
        self.num_heads = H
        self.nope, self.rope, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.kv_rank = a.kv_lora_rank
        qk = self.nope + self.rope
        if a.q_lora_rank is None:
            self.wq = nn.Linear(D, H * qk, bias=False)
            self.wq_a = self.q_norm = self.wq_b = None
        else:
            self.wq = None
            self.wq_a = nn.Linear(D, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.wq_b = nn.Linear(a.q_lora_rank, H * qk, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, MLA_LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        # YaRN stretches the context; DeepSeek sharpens the softmax to match (see
        # RopeScalingConfig.softmax_factor). Without scaling: SDPA's own 1/sqrt(head dim).
        scaling = cfg.rope_scaling
        self.scale = None if scaling is None else scaling.softmax_factor() / math.sqrt(qk)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        B, S, _ = x.shape
        H = self.num_heads
        if self.wq is not None:
            q = self.wq(x)
        else:
            assert self.wq_a is not None and self.q_norm is not None and self.wq_b is not None
            q = self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, H, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, S, 1, self.rope), cos, sin).expand(B, S, H, self.rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        out = _attend(q, k, v, attn_mask, cache, layer, scale=self.scale)  # (B, S, H, v_dim)
        return self.wo(out.reshape(B, S, -1))

    def init_weights(
        self, std: float, out_std: float, generator: torch.Generator | None = None
    ) -> None:
        for lin in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b):
            if lin is not None:
                nn.init.normal_(lin.weight, mean=0.0, std=std, generator=generator)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std, generator=generator)
        for norm in (self.q_norm, self.kv_norm):
            if norm is not None:
                norm.init_weights()


def build_attention(cfg: ModelConfig) -> Attention | MLAttention:
    return MLAttention(cfg) if cfg.attention.kind == "mla" else Attention(cfg)
