"""The decoder-only transformer: embed -> [x + attn(norm x); x + ffn(norm x)] * L -> norm -> head.

A layer's feed-forward is a dense MLP or an MoE layer, as `ModelConfig.is_moe_layer` says; a
dense model is the same code with every layer dense.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.files import format_bytes
from moekit.moe.layer import DEFAULT_ROUTE, MoELayer, MoEStats, RouteOptions
from moekit.moe.router import check_expert_ids, check_replay_shape
from moekit.nn.attention import build_attention
from moekit.nn.irope import IRoPEAttention, IRoPEInputs, irope_inputs
from moekit.nn.kv_cache import KVCache
from moekit.nn.mlp import MLP, Activation
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import per_head, rope_tables


class ModelOutput(NamedTuple):
    """logits: (B, S, vocab). aux_loss: () the weighted router losses summed over MoE layers
    (0 for a dense model); add it to the language-modelling loss. moe_stats: one `MoEStats`
    per MoE layer, keyed by layer index."""

    logits: Tensor
    aux_loss: Tensor
    moe_stats: dict[int, MoEStats]


class Block(nn.Module):
    ffn: MLP | MoELayer

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = IRoPEAttention(cfg, layer) if cfg.irope is not None else build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            assert cfg.moe is not None
            self.ffn = MoELayer(cfg.dim, cfg.moe, Activation.of(cfg))
        else:
            self.ffn = MLP(cfg.dim, cfg.dense_hidden, Activation.of(cfg))

    def init_weights(self, std: float, out_std: float, gen: torch.Generator | None) -> None:
        """Initialise the block as `Transformer.init_weights` describes."""
        self.attn_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attn.init_weights(std, out_std, gen)
        self.ffn.init_weights(std, out_std, gen)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        route: RouteOptions = DEFAULT_ROUTE,
        irope: IRoPEInputs | None = None,
    ) -> tuple[Tensor, MoEStats | None]:
        h = self.attn_norm(x)
        if isinstance(self.attn, IRoPEAttention):
            x = x + self.attn(h, cos, sin, attn_mask, cache, layer, irope)
        else:
            x = x + self.attn(h, cos, sin, attn_mask, cache, layer)
        h, stats = self._ffn(self.ffn_norm(x), route)
        return x + h, stats

    def _ffn(self, x: Tensor, route: RouteOptions) -> tuple[Tensor, MoEStats | None]:
        if isinstance(self.ffn, MoELayer):
            return self.ffn(x, route=route)
        return self.ffn(x), None


class Transformer(nn.Module):
    """A decoder-only language model built from a `ModelConfig`. Build it with `build_model`."""

    lm_head: nn.Linear | None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # An uninitialised weight (init_weights sets it): nn.Embedding's own initialisation
        # would import torch's compiler (seconds) the first time a model is made on meta.
        self.embed = nn.Embedding(
            cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)
        )
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        self.rope_dim = (
            cfg.attention.qk_rope_head_dim if cfg.attention.kind == "mla" else cfg.head_dim
        )

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        valid: Tensor | None = None,
        token_mask: Tensor | None = None,
        causal_routing: bool | None = None,
        top_k: int | Tensor | None = None,
        return_routing: bool = False,
        routing_stats: bool = True,
        last_logits: bool = False,
        routed_experts: Tensor | None = None,
        routed_mask: Tensor | None = None,
    ) -> ModelOutput:
        """Run the model on token ids `tokens` (B, S).

        positions: (S,) or (B, S) position ids; default 0..S-1 (with a cache: the count of
            real tokens before each).
        attn_mask: boolean (B, 1, S, S) mask, True where attention is allowed; default causal.
            Sliding-window layers (`AttentionConfig.sliding_window`) narrow it to their window.
        cache: a `moekit.infer.KVCache`; the tokens are appended to it and attend to it.
        valid: with a cache, (B, S) bool marking real tokens (False: left padding).
        token_mask: (B, S) bool, the tokens that take part in routing (False: padding, which
            goes to no expert and counts in no routing statistic or router loss).
        causal_routing: inference routing (generation, serving, evaluation): expert-choice
            routers run their causal mode and token choice is dropless (no capacity), so a
            token's output depends neither on later tokens nor on other rows of the batch.
        top_k: experts per token for this call instead of the config's: an int, or (B,) one
            count per sequence (rows of a serving batch may ask for different counts).
        return_routing: fill `MoEStats.routing` with each token's experts and weights.
        routing_stats: False skips the routing statistics (decoding does not read them):
            `moe_stats` is then empty unless `return_routing` asks for the routing, and
            `aux_loss` is 0.
        last_logits: compute the logits of the last position only, (B, 1, vocab): all that
            generation reads (the LM head over every prompt position is a large share of a
            prefill's arithmetic).
        routed_experts: (B, S, M, K) int, a routing to replay: each token's K experts in each
            of the M MoE layers, in layer order (-1: an empty slot); see `_replays`.
        routed_mask: (B, S) bool, the tokens that replay `routed_experts` (default all).
        """
        S = tokens.shape[1]
        positions, attn_mask = self._positions(tokens, positions, attn_mask, cache, valid)
        if isinstance(top_k, Tensor):
            top_k = top_k.to(tokens.device).repeat_interleave(S)  # one count per token
        mask = token_mask.reshape(-1).to(tokens.device) if token_mask is not None else None
        route = RouteOptions(causal_routing, top_k, record=return_routing, mask=mask,
                             stats=routing_stats)  # fmt: skip
        replays = self._replays(route, tokens, routed_experts, routed_mask)
        x = self.embed(tokens)
        cfg = self.cfg
        cos, sin = per_head(
            *rope_tables(positions, self.rope_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
        )
        window_mask = self._window_mask(S, attn_mask, cache, tokens.device)
        # Interleaved RoPE / NoPE: the masks and query scales its layers share.
        irope = None if cfg.irope is None else irope_inputs(cfg.irope, positions, attn_mask, cache)
        stats: dict[int, MoEStats] = {}
        aux = x.new_zeros((), dtype=torch.float32)
        grad = torch.is_grad_enabled()  # without autograd the router losses are all 0
        for i, block in enumerate(self.blocks()):
            sliding = window_mask is not None and self.cfg.attention.is_sliding_layer(i)
            mask = window_mask if sliding else attn_mask
            layer_route = replays.get(i, route)
            x, layer_stats = block(x, cos, sin, mask, cache, i, layer_route, irope)
            if layer_stats is not None:
                assert isinstance(block.ffn, MoELayer)
                stats[i] = layer_stats
                if grad:
                    aux = aux + block.ffn.weighted_loss(layer_stats)
        if cache is not None:
            cache.commit(S)
        x = self.norm(x[:, -1:] if last_logits else x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)
        return ModelOutput(logits, aux, stats)

    def _replays(
        self,
        route: RouteOptions,
        tokens: Tensor,
        routed_experts: Tensor | None,
        routed_mask: Tensor | None,
    ) -> dict[int, RouteOptions]:
        """Each MoE layer's routing options with its part of `routed_experts`; empty when
        there is nothing to replay.

        The replayed experts replace the routers' choice; each router weights them from its
        own scores exactly as it weights its own choice, so replaying a recorded routing gives
        the recorded logits, and gradients reach the routers as usual. Expert-choice routers
        replay in either mode. A wrong shape, an expert id out of range, an expert twice for
        one token or more slots than the router gives is a ValueError."""
        if routed_experts is None:
            if routed_mask is not None:
                raise ValueError("routed_mask was given without routed_experts")
            return {}
        layers = self.moe_layers()
        if not layers:
            raise ValueError("routed_experts was given, but this model has no MoE layers")
        B, S = tokens.shape
        shape = tuple(routed_experts.shape)
        if routed_experts.dim() != 4 or shape[:3] != (B, S, len(layers)):
            raise ValueError(
                f"routed_experts has shape {shape}: expected ({B}, {S}, {len(layers)}, K) for "
                f"{B} sequences of {S} tokens through this model's {len(layers)} MoE layers"
            )
        rows = None
        if routed_mask is not None:
            if tuple(routed_mask.shape) != (B, S) or routed_mask.dtype != torch.bool:
                raise ValueError(
                    f"routed_mask must be a ({B}, {S}) bool tensor, got "
                    f"{tuple(routed_mask.shape)} {routed_mask.dtype}"
                )
            rows = routed_mask.reshape(-1).to(tokens.device)
        experts = routed_experts.to(tokens.device).reshape(B * S, len(layers), shape[3])
        out = {}
        for j, (i, layer) in enumerate(layers.items()):
            name = f"routed_experts (MoE layer {i})"
            check_replay_shape(experts[:, j], B * S, layer.router.max_top_k, name)
            out[i] = replace(route, experts=experts[:, j], rows=rows)
        # The ids of every layer at once: one device round trip, not one per layer.
        check_expert_ids(experts, layer.router.num_experts, "routed_experts")
        return out

    def _positions(
        self,
        tokens: Tensor,
        positions: Tensor | None,
        attn_mask: Tensor | None,
        cache: KVCache | None,
        valid: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The position ids and attention mask of a forward over `tokens` (see `forward`): a
        cache supplies both; a sequence longer than the model's context is a ValueError."""
        S = tokens.shape[1]
        if cache is None and self.cfg.max_seq_len < S:
            raise ValueError(
                f"sequence of {S} tokens is longer than the model's max_seq_len "
                f"({self.cfg.max_seq_len})"
            )
        if cache is not None:
            cache_positions, attn_mask = cache.begin(S, valid)
            positions = cache_positions if positions is None else positions
        if positions is None:
            positions = torch.arange(S, device=tokens.device)
        return positions, attn_mask

    def _window_mask(
        self, length: int, attn_mask: Tensor | None, cache: KVCache | None, device: torch.device
    ) -> Tensor | None:
        """The mask of the sliding-window layers (`AttentionConfig.sliding_window`): `attn_mask`
        (default causal) that also hides keys `window` or more positions before the query;
        None when there is no window or it hides nothing here."""
        window = self.cfg.attention.sliding_window
        if window is None:
            return None
        if cache is not None:
            return cache.window_mask(window)
        if length <= window:
            return None
        query = torch.arange(length, device=device)[:, None]
        keys = torch.arange(length, device=device)[None, :]
        band = (keys <= query) & (keys > query - window)  # (S, S)
        return band if attn_mask is None else attn_mask & band

    def blocks(self) -> list[Block]:
        """The transformer blocks, in order."""
        return [b for b in self.layers if isinstance(b, Block)]

    def moe_layers(self) -> dict[int, MoELayer]:
        """The MoE layers, by layer index."""
        return {i: b.ffn for i, b in enumerate(self.blocks()) if isinstance(b.ffn, MoELayer)}

    @torch.no_grad()
    def update_router_biases(self, tokens_per_expert: dict[int, Tensor]) -> None:
        """One aux-loss-free balancing step per MoE layer from its routed counts (summed over the
        optimizer step's micro-batches); layers without a selection bias are left alone."""
        layers = self.moe_layers()
        for i, counts in tokens_per_expert.items():
            layers[i].update_bias(counts)

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        """Initialise every parameter and buffer in place.

        Linear and embedding weights ~ N(0, init_std); the projections that write into the
        residual stream (attention output, MLP and expert down projections) ~ N(0, init_std /
        sqrt(2 * num_layers)) so the residual variance does not grow with depth; router
        weights ~ N(0, init_std); norm gains 1; biases and router selection biases 0.
        `seed` makes the result independent of the global RNG (None: use the global RNG).
        """
        device = self.embed.weight.device
        gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        for _, piece in self.pieces():
            self.init_piece(piece, gen)

    def pieces(self) -> list[tuple[str, nn.Module]]:
        """The model's top-level parts in state-dict (and initialisation) order, each with
        its name prefix: the embedding, every block, the final norm, the output head."""
        pieces: list[tuple[str, nn.Module]] = [("embed", self.embed)]
        pieces += [(f"layers.{i}", block) for i, block in enumerate(self.blocks())]
        pieces.append(("norm", self.norm))
        if self.lm_head is not None:
            pieces.append(("lm_head", self.lm_head))
        return pieces

    def init_piece(self, piece: nn.Module, gen: torch.Generator | None) -> None:
        """Initialise one of `pieces()` as `init_weights` describes."""
        std = self.cfg.init_std
        if isinstance(piece, Block):
            piece.init_weights(std, std / math.sqrt(2 * self.cfg.num_layers), gen)
        elif isinstance(piece, RMSNorm):
            piece.init_weights()
        else:
            assert isinstance(piece, nn.Embedding | nn.Linear)
            nn.init.normal_(piece.weight, mean=0.0, std=std, generator=gen)


@torch.no_grad()
def random_tensors(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """The named float32 tensors of a randomly initialised model `cfg` (the distribution of
    `Transformer.init_weights`), in state-dict order, made one piece (the embedding, a block,
    the final norm, the output head) at a time: a model far larger than memory can be written
    (quantised, say) without ever existing whole. The numbers are `build_model(cfg,
    seed=seed)`'s: the same generator draws them in the same order."""
    model = meta_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    names = set(model.state_dict())
    for prefix, piece in model.pieces():
        piece.to_empty(device="cpu")
        model.init_piece(piece, gen)
        for name, t in piece.state_dict().items():
            names.discard(f"{prefix}.{name}")
            yield f"{prefix}.{name}", t
        piece.to_empty(device="meta")  # its memory goes before the next piece is made
    assert not names, f"tensors outside every piece: {sorted(names)}"


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model `cfg` describes on the meta device: every parameter's name, shape and dtype,
    and no memory (what checks a config against stored weights or memory before building)."""
    with torch.device("meta"):
        return Transformer(cfg)


def build_model(
    cfg: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> Transformer:
    """Build and initialise the model `cfg` describes.

    The modules are created on the meta device (no memory), then materialised on `device`
    ("auto": CUDA when present, else the CPU) and initialised once by
    `Transformer.init_weights(seed)`. With a non-float32 `dtype` the router
    weights stay float32. A model larger than the memory `device` has available is a
    ValueError that says both sizes, before anything is allocated.
    """
    from moekit.runtime import resolve_device

    model = meta_model(cfg)
    target = resolve_device(device)
    check_memory(model, target)
    model.to_empty(device=target)
    model.init_weights(seed)
    return cast_model(model, dtype)


def check_memory(model: nn.Module, device: torch.device) -> None:
    """ValueError when `model` (on the meta device) would need more memory than `device` has
    available: a config with a dimension far too large is refused with the sizes instead of
    failing inside the allocator. Nothing is checked where the available memory is unknown."""
    tensors = [*model.parameters(), *model.buffers()]
    needed = sum(t.numel() * t.element_size() for t in tensors)
    available = available_memory(device)
    if available is None or needed <= available:
        return
    params = sum(p.numel() for p in model.parameters())
    raise ValueError(
        f"the model this config describes has {params:,} parameters and needs "
        f"{format_bytes(needed)} of memory, but {device} has {format_bytes(available)} "
        "available; check the config's sizes (dim, num_layers, vocab_size, num_experts, "
        "expert_hidden)"
    )


def available_memory(device: torch.device) -> int | None:
    """The bytes `device` can still allocate: on the CPU the kernel's MemAvailable plus free
    swap, on CUDA the free device memory plus what PyTorch has cached; None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f if ":" in line}
        return (int(info["MemAvailable"]) + int(info.get("SwapFree", 0))) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:  # elsewhere: all physical memory, a looser bound
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast the model's floating-point weights to `dtype`, keeping every router (weights and
    selection bias) in exact float32. Returns the model."""
    if dtype == torch.float32:
        return model
    routers = [layer.router for layer in model.moe_layers().values()]
    kept = [{k: v.detach().clone() for k, v in r.state_dict().items()} for r in routers]
    model.to(dtype)
    for router, state in zip(routers, kept, strict=True):
        router.float()
        router.load_state_dict(state)
    return model
