"""A compiled decode step: one new token per row through the whole model as one graph.

At demo sizes a decode step is a few hundred small PyTorch calls whose fixed cost dwarfs
their arithmetic. `torch.compile` turns the whole step (embedding, every block, the head)
into generated code (C++ on the CPU) with a handful of calls, which only pays when the step
has the same shapes every time. So the step here is written for static shapes:

- the KV cache is allocated at a bucketed length (`cache_length`), and every step attends
  to all of it under a mask of the positions holding real tokens;
- each row writes its new key and value at its own position (an indexed store, no slicing
  by a Python integer), and the cache's positions and mask advance inside the graph;
- an MoE layer multiplies each token by its chosen experts' weights, indexed inside the
  reduction (only the chosen experts are read), with no Python loop over experts; large
  float experts on AVX-512 CPUs (`moekit.moe.decode_kernel.library_reads`) go instead to the
  native streaming kernel (`moekit.moe.native`, built before tracing), or where it cannot be
  built to an operator that calls the library's products on the chosen experts' weights
  (`grouped_swiglu`); int4 experts there go to the native int4 kernel;
- at a single row on the CPU, dense projections (below that size on AVX-512 CPUs) are
  reductions over each weight row (`_dense`): fused with their neighbours, and cheaper per
  call than the library's matrix-vector product; larger ones there are streamed by the native
  dense kernel (up to `moekit.moe.native.NATIVE_MAX_TOKENS` rows) or the library's product;
- quantised weights (int8 and int4 experts, and with `--only all` every other projection)
  are read packed: the expert index, the unpacking and the scaling sit inside the same
  reduction, so the step reads only the chosen experts' packed bytes and never writes a
  float weight (the arithmetic of `moekit.quant.kernels`).

It is used only where it is exact and safe: inference without adapters, hooks, routing
records or paged experts (those load on demand between the router and the experts);
grouped-query attention (with or without q/k norms, or with interleaved RoPE / NoPE layers;
no sinks or sliding window), SwiGLU feed-forwards without biases and token-choice routers
(flat top-k or hierarchical) without a logit bias. `decode_support` says why a model is not
supported; a compilation that fails is reported once on the `moekit` logger and the step
falls back to the eager model. On the CPU the graph is driven by inductor's C++ wrapper
(`cpp_wrapper`; a first compile that fails with it is retried once without). On CUDA the step
asks for CUDA graphs ("reduce-overhead").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.irope import IRoPEConfig
from moekit.model import Block, Transformer
from moekit.moe import native
from moekit.moe.decode_kernel import grouped_swiglu, library_reads, swiglu_sum
from moekit.moe.experts import Experts
from moekit.moe.layer import MoELayer
from moekit.moe.router import HierarchicalRouter, RouterOutput, TopKRouter
from moekit.nn.attention import Attention
from moekit.nn.fuse import plain
from moekit.nn.irope import IRoPEAttention, l2_norm
from moekit.nn.kv_cache import KVCache
from moekit.nn.mlp import MLP
from moekit.nn.rope import apply_rope, rope_tables
from moekit.quant import kernels
from moekit.quant.experts import QuantExperts
from moekit.quant.weight import QuantLinear, QuantWeight

log = logging.getLogger("moekit")

MIN_BUCKET = 64  # the shortest cache a compiled step is built for

# Per block, the fused weights the graph reads: (qkv weight, qkv bias, gate+up of the
# dense MLP or of the experts, gate+up of the shared experts); None where those projections
# are quantised (the graph reads their packed weights).
BlockWeights = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]
# One MoE layer's routing in a decode step: its decision, copies per expert (E,), and the
# mean routing entropy, over the live rows.
LayerRouting = tuple[RouterOutput, Tensor, Tensor]


def cache_length(needed: int, max_seq_len: int) -> int:
    """The cache length a compiled step uses for `needed` positions: the next power of two
    (at least `MIN_BUCKET`), capped at `max_seq_len`, so that a few lengths cover every
    request and each is compiled once."""
    length = MIN_BUCKET
    while length < needed:
        length *= 2
    return max(needed, min(length, max_seq_len))


def _quant_support(w: QuantWeight) -> str | None:
    if w.bits == 4 and (w.group is None or w.group % 8):
        return "int4 weights whose group size is not a multiple of 8"
    return None


def _linear_support(*modules: nn.Module | None) -> str | None:
    """None when the graph can compute every projection in `modules` (bare `nn.Linear`s or
    quantised linears, without hooks), else why not."""
    for m in modules:
        if isinstance(m, QuantLinear) and not (m._forward_hooks or m._forward_pre_hooks):
            reason = _quant_support(m)
            if reason is not None:
                return reason
        elif not plain(m):
            return "projections with adapters or hooks"
    return None


def _ffn_support(ffn: MLP | MoELayer) -> str | None:
    if isinstance(ffn, MLP):
        if ffn.activation != "swiglu":
            return "a dense MLP that is not SwiGLU"
        return _linear_support(ffn.w_gate, ffn.w_up, ffn.w_down)
    ex = ffn.experts
    if type(ex) is QuantExperts:
        if ex.w_gate is None:
            return "quantised experts without SwiGLU"
        if ex.plain_math() is not None:
            return f"quantised {ex.plain_math()}"
        if ffn.cfg.scale_expert_input:
            return "quantised experts weighted on their inputs (scale_expert_input)"
        reason = _quant_support(ex.w_up)
        if reason is not None:
            return f"quantised experts: {reason}"
    elif type(ex) is not Experts:
        from moekit.infer.expert_cache import SlotCache

        if isinstance(ex, SlotCache):
            return "paged experts (they are loaded on demand)"
        return f"experts of type {type(ex).__name__}"
    elif len(ex.adapters) or ex.w_gate is None:
        return "experts with adapters or without SwiGLU"
    elif ex.plain_math() is not None:
        return ex.plain_math()
    router = ffn.router
    plain_router = type(router) in (TopKRouter, HierarchicalRouter)
    if not plain_router or router.adapter is not None or router.bias is not None:
        return "a router other than plain token choice (no adapter, no logit bias)"
    if ffn.shared is not None and _ffn_support(ffn.shared) is not None:
        return "shared experts that are not a plain SwiGLU"
    if ffn.shared_gate is not None and not plain(ffn.shared_gate):
        return "a shared-expert gate with adapters"
    return None


def decode_support(model: Transformer) -> str | None:
    """None when `model` can decode through the compiled step, else the reason it cannot."""
    if model.training:
        return "the model is in training mode"
    if model.lm_head is not None and _linear_support(model.lm_head) is not None:
        return f"the LM head: {_linear_support(model.lm_head)}"
    for i, block in enumerate(model.blocks()):
        attn = block.attn
        if not isinstance(attn, Attention):
            return "multi-head latent attention"
        reason = _linear_support(attn.wq, attn.wk, attn.wv, attn.wo)
        if reason is not None:
            return f"layer {i}'s attention: {reason}"
        if attn.sinks is not None:
            return "attention sinks"
        if model.cfg.attention.is_sliding_layer(i):
            return "sliding-window attention"
        reason = _ffn_support(block.ffn)
        if reason is not None:
            return f"layer {i}: {reason}"
    return None


def _block_weights(block: Block) -> BlockWeights:
    """The fused weights of one block (made once and reused; see moekit.nn.fuse); None for
    projections that are quantised (the graph reads their packed weights instead)."""
    attn = block.attn
    assert isinstance(attn, Attention)
    lins = (attn.wq, attn.wk, attn.wv)
    qkv = bias = None
    if all(type(lin) is nn.Linear for lin in lins):
        qkv = attn._qkv.get([lin.weight for lin in lins])
        if attn.wq.bias is not None:
            bias = attn._qkv_bias.get([lin.bias for lin in lins if lin.bias is not None])
    ffn = block.ffn
    if isinstance(ffn, MLP):
        return qkv, bias, _fused_gate_up(ffn), None
    gate_up = ffn.experts.fused_gate_up() if type(ffn.experts) is Experts else None
    shared = _fused_gate_up(ffn.shared) if ffn.shared is not None else None
    return qkv, bias, gate_up, shared


def _fused_gate_up(mlp: MLP) -> Tensor | None:
    if type(mlp.w_gate) is not nn.Linear or type(mlp.w_up) is not nn.Linear:
        return None
    return mlp._gate_up.get([mlp.w_gate.weight, mlp.w_up.weight])


def _quant_product(x: Tensor, w: QuantWeight) -> Tensor:
    """`x @ w^T` from the packed weights, in the graph (`kernels.int4_product`, and its int8
    sibling): (..., N) for x (..., K)."""
    parts = w.kernel_parts()
    if w.bits == 4:
        return kernels.int4_product(x, parts[0], parts[1], parts[2])
    return kernels.int8_product(x, parts[0], parts[1])


def _dense(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, w, bias)`; on the CPU, for a single row and a weight below
    `LIBRARY_MIN_ELEMENTS` (or any weight on a CPU without AVX-512), written as a reduction
    over each weight row instead, which the compiler fuses with its neighbours (measured in
    docs/benchmarks.md: 1.4x the demo model's batch-1 step). Large weights on AVX-512 CPUs
    stay with the library's product, which reads them faster there (`library_reads`); with
    more rows the library matmul stays too (as a reduction it re-reads the weight per row)."""
    if library_reads(w) and native.takes_linear(x2 := x.reshape(-1, x.shape[-1]), w):
        out = native.linear(x2, w).view(*x.shape[:-1], w.shape[0])  # streamed (moekit.moe.native)
        return out if bias is None else out + bias
    if x.device.type != "cpu" or x.numel() != x.shape[-1] or library_reads(w):
        return F.linear(x, w, bias)
    out = (w * x.reshape(1, -1)).sum(-1).view(*x.shape[:-1], w.shape[0])
    return out if bias is None else out + bias


def _linear(x: Tensor, lin: nn.Module) -> Tensor:
    """A bare or a quantised linear layer on x."""
    if isinstance(lin, QuantLinear):
        out = _quant_product(x, lin)
        return out if lin.bias is None else out + lin.bias.to(out.dtype)
    assert isinstance(lin, nn.Linear)
    return _dense(x, lin.weight, lin.bias)


def _swiglu(x: Tensor, mlp: MLP, gate_up: Tensor | None) -> Tensor:
    if gate_up is not None:
        gate, up = _dense(x, gate_up).chunk(2, dim=-1)
    else:
        assert mlp.w_gate is not None
        gate, up = _linear(x, mlp.w_gate), _linear(x, mlp.w_up)
    return _linear(F.silu(gate) * up, mlp.w_down)


def _attend(q_BHd: Tensor, k_BGLd: Tensor, v_BGLd: Tensor, mask_BL: Tensor) -> Tensor:
    """One query per row and head against the cache, written out (softmax of masked scores)
    so the compiler fuses it: q (B, H, hd), cache (B, Hkv, L, hd) -> (B, H, hd)."""
    B, H, hd = q_BHd.shape
    G = k_BGLd.shape[1]
    q = q_BHd.view(B, G, H // G, 1, hd) * hd**-0.5
    scores = (q * k_BGLd[:, :, None]).sum(-1)  # (B, G, H/G, L)
    scores = scores.masked_fill(~mask_BL[:, None, None, :], float("-inf"))
    p = scores.float().softmax(-1).to(v_BGLd.dtype)
    out = (p[..., None] * v_BGLd[:, :, None]).sum(-2)  # (B, G, H/G, hd)
    return out.reshape(B, H, hd)


def _moe(
    layer: MoELayer,
    x_TD: Tensor,
    gate_up_E2FD: Tensor | None,
    shared: Tensor | None,
    top_k: int | None,
) -> tuple[Tensor, RouterOutput]:
    """The MoE layer on a few tokens, each token multiplied by its chosen experts' weights:
    the expert index is read inside the reduction, so only those experts' rows are read.
    Returns the output and the router's decision."""
    decision = layer.router(x_TD, causal=True, top_k=top_k)
    experts_TK = decision.experts
    ex = layer.experts
    if isinstance(ex, QuantExperts) and (parts := ex.native_parts(x_TD)) is not None:
        # int4 experts through the native kernel (moekit.moe.native), where it is built
        out_TD = native.grouped_swiglu_int4(
            x_TD, experts_TK, decision.weights, *parts, scale_input=layer.cfg.scale_expert_input
        )
    elif isinstance(ex, QuantExperts):  # the packed weights, as the one-token kernel reads them
        product, gate, up, down = ex.token_math()
        out_TD = swiglu_sum(x_TD, experts_TK, decision.weights, gate, up, down, product)
    elif gate_up_E2FD is not None and library_reads(ex.w_down[0]):
        # Large float experts: the library's products, called from the graph as an operator.
        weights_TK, on_input = decision.weights, layer.cfg.scale_expert_input
        stream = native.takes(x_TD, gate_up_E2FD, ex.w_down)  # the native kernel where built
        op = native.grouped_swiglu if stream else grouped_swiglu
        out_TD = op(x_TD, experts_TK, weights_TK, gate_up_E2FD, ex.w_down, on_input)
    else:
        # Float experts: gate and up as one reduction over their fused rows (as separate
        # reductions through `swiglu_sum` the demo model's step measured 1.6x slower).
        assert gate_up_E2FD is not None
        w_TK1 = decision.weights.to(x_TD.dtype)[:, :, None]
        on_input = layer.cfg.scale_expert_input  # the weight scales the expert's input
        x_TKD = x_TD[:, None, :] * w_TK1 if on_input else x_TD[:, None, :]
        w_up = gate_up_E2FD[experts_TK]  # (T, K, 2F, D), indexed in the reduction below
        gate, up = (x_TKD[:, :, None, :] * w_up).sum(-1).chunk(2, dim=-1)  # (T, K, F)
        h_TKF = F.silu(gate) * up
        w_down = ex.w_down[experts_TK]  # (T, K, D, F)
        y_TKD = (h_TKF[:, :, None, :] * w_down).sum(-1)
        out_TD = (y_TKD if on_input else y_TKD * w_TK1).sum(1)
    if layer.shared is not None:
        shared_TD = _swiglu(x_TD, layer.shared, shared)
        if layer.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(layer.shared_gate(x_TD))
        out_TD = out_TD + shared_TD
    return out_TD, decision


def _routing_stats(layer: MoELayer, decision: RouterOutput, live_B: Tensor) -> LayerRouting:
    """A layer's decision with the statistics the eager layer reports, over the live rows:
    copies routed to each expert (E,) and the mean routing entropy (computed in the graph,
    where they cost next to nothing)."""
    experts_BK = decision.experts
    copies_BK = ((experts_BK >= 0) & live_B[:, None]).long()
    counts_E = torch.zeros(layer.cfg.num_experts, dtype=torch.long, device=experts_BK.device)
    counts_E = counts_E.scatter_add(0, experts_BK.clamp_min(0).flatten(), copies_BK.flatten())
    p = layer.router.probs(decision.logits).float().clamp_min(1e-12)
    entropy_B = -(p * p.log()).sum(-1)
    live = live_B.to(entropy_B.dtype)
    entropy = (entropy_B * live).sum() / live.sum().clamp_min(1.0)
    return decision, counts_E, entropy


def _attention(
    attn: Attention,
    w: BlockWeights,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    end_B: Tensor,
    mask: Tensor,
    temperature_B: Tensor | None = None,
) -> Tensor:
    """One new token per row: project, normalise (q/k norms), rotate, store at the row's
    position, attend. An interleaved RoPE / NoPE layer rotates or not, normalises after the
    rotation, and scales its queries by `temperature_B` (`_irope_step`)."""
    B = x.shape[0]
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if w[0] is not None:
        qkv = _dense(x, w[0], w[1])
    else:
        qkv = torch.cat([_linear(x, attn.wq), _linear(x, attn.wk), _linear(x, attn.wv)], -1)
    if isinstance(attn, IRoPEAttention):
        q, k, v = qkv.view(B, 1, H + 2 * Hkv, hd).split([H, Hkv, Hkv], dim=2)
        if attn.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn.l2:
            q, k = l2_norm(q, attn.eps), l2_norm(k, attn.eps)
        if attn.tuned and temperature_B is not None:
            q = q * temperature_B[:, None, None, None].to(q.dtype)
    elif attn.q_norm is None or attn.k_norm is None:
        qkv = qkv.view(B, 1, H + 2 * Hkv, hd)
        q, k = apply_rope(qkv[:, :, : H + Hkv], cos, sin).split([H, Hkv], dim=2)
        v = qkv[:, :, H + Hkv :]
    else:  # as `Attention.forward`: norms over all heads ("full") or each head ("head")
        q, k, v = qkv.split(attn.qkv_sizes, dim=-1)
        if attn.qk_norm == "full":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.view(B, 1, H, hd), k.view(B, 1, Hkv, hd), v.view(B, 1, Hkv, hd)
        if attn.qk_norm == "head":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = torch.arange(B, device=x.device)
    k_cache[rows, :, end_B] = k[:, 0].to(k_cache.dtype)  # (B, Hkv, hd) at (row, :, end)
    v_cache[rows, :, end_B] = v[:, 0].to(v_cache.dtype)
    out = _attend(q[:, 0], k_cache, v_cache, mask)
    return _linear(out.reshape(B, 1, -1), attn.wo)


def _irope_step(
    irope: IRoPEConfig | None, valid_BL: Tensor, seen_B: Tensor, end_B: Tensor, mask_BL: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Interleaved RoPE / NoPE in one decode step, as `moekit.nn.irope.irope_inputs`: the
    chunked layers' mask (keys in the new token's chunk of real positions) and the NoPE
    layers' query temperatures (B,), from the rows' real positions `seen_B`."""
    if irope is None:
        return mask_BL, None
    chunk_mask = mask_BL
    if irope.chunk_size is not None:
        C = irope.chunk_size
        keys_L = torch.arange(valid_BL.shape[1], device=valid_BL.device)
        key_pos_BL = valid_BL.long().cumsum(1) - 1
        same = (key_pos_BL // C == (seen_B // C)[:, None]) | (keys_L == end_B[:, None])
        chunk_mask = mask_BL & same
    temperature_B = None
    if irope.temperature_tuning:
        steps = torch.floor((seen_B.float() + 1.0) / irope.floor_scale)
        temperature_B = torch.log1p(steps) * irope.attn_scale + 1.0
    return chunk_mask, temperature_B


def decode_step(
    model: Transformer,
    weights: list[BlockWeights],
    tokens_B1: Tensor,
    rope: tuple[Tensor, Tensor],
    ks: list[Tensor],
    vs: list[Tensor],
    valid_BL: Tensor,
    end_B: Tensor,
    live_B: Tensor,
    top_k: int | None,
    routing: bool = False,
) -> Tensor | tuple[Tensor, list[LayerRouting]]:
    """One decode step on a cache's tensors, updated in place: each row's token (B, 1) is
    stored at position `end_B` (marked valid where `live_B`), attends to the valid positions,
    and the rows in `live_B` advance. `rope`: the cos and sin tables of every position (L, dim),
    made once (computed inside the graph, they would be repeated in every fused kernel).
    Returns the next-token logits (B, vocab), float32; with `routing`, also each MoE layer's
    router decision and statistics over the live rows (`_routing_stats`), in layer order."""
    # long function: the whole step is one graph (embedding, blocks, head) for the compiler
    cfg = model.cfg
    L = valid_BL.shape[1]
    seen_B = valid_BL.sum(1)  # real tokens before the new one: its RoPE position
    rows = torch.arange(tokens_B1.shape[0], device=tokens_B1.device)
    valid_BL[rows, end_B] = live_B
    keys_L = torch.arange(L, device=valid_BL.device)
    mask = valid_BL | (keys_L == end_B[:, None])  # (B, L)
    chunk_mask, temperature_B = _irope_step(cfg.irope, valid_BL, seen_B, end_B, mask)
    x = model.embed(tokens_B1)
    decisions: list[LayerRouting] = []
    cos, sin = rope[0][seen_B][:, None, None, :], rope[1][seen_B][:, None, None, :]
    for i, block in enumerate(model.blocks()):
        attn = block.attn
        assert isinstance(attn, Attention)
        w = weights[i]
        h = block.attn_norm(x)
        m = chunk_mask if isinstance(attn, IRoPEAttention) and attn.chunked else mask
        x = x + _attention(attn, w, h, cos, sin, ks[i], vs[i], end_B, m, temperature_B)
        h = block.ffn_norm(x)
        if isinstance(block.ffn, MoELayer):
            y, decision = _moe(block.ffn, h.view(-1, cfg.dim), w[2], w[3], top_k)
            x = x + y.view_as(x)
            if routing:
                decisions.append(_routing_stats(block.ffn, decision, live_B))
        else:
            x = x + _swiglu(h, block.ffn, w[2])
    end_B += live_B.to(end_B.dtype)
    x = model.norm(x)
    if model.lm_head is not None:
        logits = _linear(x[:, -1], model.lm_head).float()
    else:
        logits = _dense(x[:, -1], model.embed.weight).float()
    return (logits, decisions) if routing else logits


def _root_cause(e: BaseException) -> str:
    """The compiler's own error, not its wrappers' (a backend's is `inner_exception`): its type
    and the first line of its message."""
    root = e
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
        root = inner
    text = str(root).strip()
    return f"{type(root).__name__}: {text.splitlines()[0][:200] if text else 'no message'}"


def cpp_wrapper() -> bool:
    """Whether the CPU step's graph is driven by generated C++ rather than Python
    (inductor's `cpp_wrapper`): the calls between its kernels then cost no Python, about 1.1x
    the step's speed, for 20-30 s more compiling per shape. `MOEKIT_CPP_WRAPPER=0` (exactly
    "0") turns it off; read when a `CompiledDecoder` is made."""
    return os.environ.get("MOEKIT_CPP_WRAPPER", "1") != "0"


def _native_weights(model: nn.Module) -> bool:
    """Whether the model holds weights that the native kernels may read (`moekit.moe.native`:
    large float weights on AVX-512 CPUs, int4 experts)."""
    if not native.enabled() or next(model.parameters()).device.type != "cpu":
        return False
    if any(isinstance(m, QuantExperts) and m.bits == 4 for m in model.modules()):
        return True
    return any(library_reads(p) for p in model.parameters() if p.dim() >= 2)


class CompiledDecoder:
    """`decode_step` under `torch.compile` for one model, with a fallback to the eager model.

    `step` returns the next-token logits for one token per row, or None when the compiled
    step cannot be used (the caller then runs the eager model); a failure to compile is
    logged once, with its reason, and turns the compiled step off for this decoder.
    """

    def __init__(self, model: Transformer, *, compiler: Callable[..., Any] | None = None):
        self.model = model
        self.reason = decode_support(model)
        self.failed = False
        self._compiled: Callable[..., Any] | None = None
        self._compiler = compiler
        # Driven by C++ on the CPU (read here, once); given up if it fails before ever running.
        cpu = next(model.parameters()).device.type == "cpu"
        self._cpp = compiler is None and cpu and cpp_wrapper()
        self._ran = False  # a step has run through the compiled graph
        self._tables: tuple[Tensor, Tensor] | None = None

    def _rope(self, length: int) -> tuple[Tensor, Tensor]:
        if self._tables is None or self._tables[0].shape[0] < length:
            m = self.model
            positions = torch.arange(length, device=m.embed.weight.device)
            self._tables = rope_tables(
                positions, m.rope_dim, m.cfg.rope_theta, m.embed.weight.dtype, m.cfg.rope_scaling
            )
        return self._tables[0][:length], self._tables[1][:length]

    @property
    def active(self) -> bool:
        return self.reason is None and not self.failed

    def _fn(self) -> Callable[..., Any]:
        if self._compiled is None:
            if _native_weights(self.model):
                native.load()  # built before tracing: the graph calls its operators
            if self._compiler is not None:
                self._compiled = self._compiler(decode_step)
            else:
                cuda = next(self.model.parameters()).device.type == "cuda"
                mode = "reduce-overhead" if cuda else None  # CUDA graphs on a GPU
                options: dict[str, Any] | None = None
                if self._cpp:
                    options = {"cpp_wrapper": True}
                self._compiled = torch.compile(
                    decode_step, dynamic=False, mode=mode, options=options
                )
        return self._compiled

    def step(
        self, tokens_B1: Tensor, cache: KVCache, live_B1: Tensor, top_k: int | None
    ) -> Tensor | None:
        """Logits (B, vocab) of one decode step through the compiled graph, the cache
        updated as the eager model would; None when the compiled step is off."""
        out = self.run(tokens_B1, cache.k, cache.v, cache.valid, cache.end, live_B1[:, 0], top_k)
        assert out is None or isinstance(out, Tensor)
        return out

    def run(
        self,
        tokens_B1: Tensor,
        ks: list[Tensor],
        vs: list[Tensor],
        valid_BL: Tensor,
        end_B: Tensor,
        live_B: Tensor,
        top_k: int | None,
        routing: bool = False,
    ) -> Tensor | tuple[Tensor, list[LayerRouting]] | None:
        """`decode_step` on a cache's tensors (or views of them: rows and positions of a
        larger cache) through the compiled graph; None when the compiled step is off."""
        if not self.active:
            return None
        weights = [_block_weights(b) for b in self.model.blocks()]
        args = (tokens_B1, self._rope(valid_BL.shape[1]), ks, vs, valid_BL, end_B, live_B, top_k)
        try:
            out = self._fn()(self.model, weights, *args, routing)
            self._ran = True
            return out
        except Exception as e:  # any compiler failure: fall back, and say why
            # Without the C++ wrapper, once, if no step ever ran: a compile failure raises
            # before the graph touches the cache (a later failure may come after it did).
            if self._cpp and not self._ran:
                self._cpp, self._compiled = False, None
                log.warning(
                    "compiled decoding: the C++-driven step failed (%s); compiling it with "
                    "inductor's Python wrapper instead",
                    _root_cause(e),
                )
                return self.run(tokens_B1, ks, vs, valid_BL, end_B, live_B, top_k, routing)
            self.failed = True
            log.warning(
                "compiled decoding is off: torch.compile failed (%s); decoding eagerly",
                _root_cause(e),
            )
            return None
