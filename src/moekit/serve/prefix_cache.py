"""Prefix caching: requests that share the start of their prompt (a system prompt, the earlier
turns of a chat) reuse its keys and values instead of computing them again.

A prompt is cut into blocks of `block_tokens` tokens. A block is stored under a key made of its
tokens, the block before it and what else changes its keys and values (the request's experts
per token), so a block is found only after the very same tokens, routed the same way. The keys
are compared, not just hashed: two prompts never share a block by a hash collision. A request
reuses the longest run of stored blocks at the start of its prompt, at most all but its last
token (whose logits give the first new token); its prefill starts after them. Reuse is the
arithmetic of chunked prefill (prefill.py): the cached positions are those an earlier chunk
would have left in the cache, so sliding-window and chunked-attention layers, which read the
positions, answer as they do without the cache.

The store holds at most `capacity_tokens` tokens (whole blocks) in one buffer sized up front,
and evicts the least recently used block when full. Only a block no other stored block follows
is evicted: a block is always used together with those before it, which are then marked used
after it, so the least recently used block has nothing after it.

Memory: each stored token costs the bytes of one KV-cache position, `kv_bytes_per_token`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from moekit.config import ModelConfig
from moekit.nn.kv_cache import KVCache
from moekit.serve.config import SettingError
from moekit.serve.events import EngineRequest

DEFAULT_BLOCK_TOKENS = 16
# The default capacity, as a share of the batch's own KV cache (max_batch x max_context).
DEFAULT_SHARE = 4


def may_reuse(req: EngineRequest) -> bool:
    """Whether `req` may start its prefill after cached blocks: not when it needs something
    computed at every prompt position (the prompt's logprobs, the prompt's routing), nor when
    its routing is forced (its keys and values are not those stored)."""
    if req.echo_logprobs or req.prompt_only:
        return False
    return may_store(req)


def may_store(req: EngineRequest) -> bool:
    """Whether the blocks of `req`'s prompt may be stored for other requests: not when its
    routing was forced, which gives keys and values of their own."""
    # Requests that force their routing, or ask for the routing of their prompt, carry these
    # fields (routing replay); both need the prompt computed, and the first must not be stored.
    if getattr(req, "routed_experts", None) is not None:
        return False
    return not getattr(req, "return_routed_experts", False)


def check_prefix_tokens(tokens: object) -> None:
    """A SettingError unless `tokens` is None (the default size), 0 (off) or at least one
    block."""
    if tokens is None:
        return
    if (
        isinstance(tokens, bool)
        or not isinstance(tokens, int)
        or not (tokens == 0 or tokens >= DEFAULT_BLOCK_TOKENS)
    ):
        raise SettingError(
            "prefix_cache_tokens",
            tokens,
            f"must be 0 (off) or an integer >= {DEFAULT_BLOCK_TOKENS} (one block of tokens)",
        )


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The bytes one token's keys and values take in a KV cache (all layers)."""
    probe = KVCache(cfg, 1, 1, device="meta", dtype=dtype)  # the cache's own layout, no memory
    return sum(t.nelement() * t.element_size() for t in (*probe.k, *probe.v))


def default_tokens(max_batch: int, max_context: int) -> int:
    """The default capacity: a quarter of the tokens the batch's KV cache holds."""
    return max_batch * max_context // DEFAULT_SHARE


@dataclass
class PrefixStats:
    """Counters for /metrics: lookups made (`queries`) and those that found a block (`hits`),
    prompt tokens looked up and those found, blocks stored and evicted."""

    queries: int = 0
    hits: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


@dataclass
class _Block:
    id: int  # unique for the store's lifetime (slots are reused, ids never)
    slot: int  # its place in the buffer
    key: tuple[object, ...]
    parent: _Block | None
    children: int = 0


class PrefixCache:
    """Stored prompt blocks of one model (`cfg`), at most `capacity_tokens` tokens in whole
    blocks of `block_tokens`, kept on `device` in `dtype` (those of the engine's KV cache)."""

    def __init__(
        self,
        cfg: ModelConfig,
        capacity_tokens: int,
        *,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens!r} is invalid: must be an int >= 1")
        if capacity_tokens < block_tokens:
            raise ValueError(
                f"capacity_tokens={capacity_tokens} is invalid: must hold at least one block "
                f"of {block_tokens} tokens"
            )
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype)
        probe = KVCache(cfg, 1, 1, device="meta", dtype=dtype)  # the cache's own layout
        shape = (self.capacity_blocks, cfg.num_layers, probe.k[0].shape[1], block_tokens)
        self.k = torch.zeros(*shape, probe.k[0].shape[3], device=device, dtype=dtype)
        self.v = torch.zeros(*shape, probe.v[0].shape[3], device=device, dtype=dtype)
        self._free = list(range(self.capacity_blocks - 1, -1, -1))
        self._index: dict[tuple[object, ...], _Block] = {}
        self._lru: collections.OrderedDict[int, _Block] = collections.OrderedDict()
        self._next_id = 0
        self.stats = PrefixStats()

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_tokens

    @property
    def stored_tokens(self) -> int:
        return len(self._lru) * self.block_tokens

    # ---- lookup -------------------------------------------------------------------------
    def _path(self, ids: list[int], namespace: object, blocks: int) -> list[_Block]:
        """The stored blocks that start `ids`, at most `blocks` of them."""
        path: list[_Block] = []
        parent: _Block | None = None
        for i in range(blocks):
            key = self._key(ids, i, namespace, parent)
            block = self._index.get(key)
            if block is None:
                break
            path.append(block)
            parent = block
        return path

    def _key(
        self, ids: list[int], i: int, namespace: object, parent: _Block | None
    ) -> tuple[object, ...]:
        n = self.block_tokens
        return (parent.id if parent else None, namespace, tuple(ids[i * n : (i + 1) * n]))

    def _touch(self, path: list[_Block]) -> None:
        """Mark `path` used, the blocks after last, so that the earlier ones outlive them."""
        for block in reversed(path):
            self._lru.move_to_end(block.id)

    def load(self, ids: list[int], namespace: object, cache: KVCache) -> int:
        """Copy the longest stored start of `ids` (whole blocks, all but the last token at
        most) into row 0 of an empty `cache`; returns how many tokens it holds now (0: none
        found). `namespace`: what else the keys and values depend on (experts per token)."""
        path = self._path(ids, namespace, (len(ids) - 1) // self.block_tokens)
        self.stats.queries += 1
        self.stats.query_tokens += len(ids)
        if not path:
            return 0
        self._touch(path)
        n = len(path) * self.block_tokens
        slots = torch.tensor([b.slot for b in path], device=self.k.device)
        for store, layers in ((self.k, cache.k), (self.v, cache.v)):
            picked = store[slots]  # (blocks, layers, H, block, d)
            heads, dim = picked.shape[2], picked.shape[4]
            for layer, dest in enumerate(layers):
                dest[0, :, :n] = picked[:, layer].transpose(0, 1).reshape(heads, n, dim)
        cache.valid[0] = False
        cache.valid[0, :n] = True
        cache.end[0] = n
        self.stats.hits += 1
        self.stats.hit_tokens += n
        return n

    # ---- storing ------------------------------------------------------------------------
    def store(self, ids: list[int], namespace: object, cache: KVCache) -> int:
        """Store the whole blocks of `ids`, whose keys and values row 0 of `cache` holds, that
        are not stored yet, evicting the least recently used blocks to make room; returns how
        many blocks were added. A block is findable only once its keys and values are in."""
        blocks = min(len(ids), cache.length(0)) // self.block_tokens
        path = self._path(ids, namespace, blocks)
        first = len(path)
        slots: list[int] = []
        for _ in range(first, blocks):
            slot = self._free_slot(protect=path)
            if slot is None:
                break
            slots.append(slot)
        try:
            self._copy_in(slots, first, cache)
        except BaseException:
            self._free += slots
            raise
        for i, slot in enumerate(slots, first):
            parent = path[-1] if path else None
            block = _Block(self._next_id, slot, self._key(ids, i, namespace, parent), parent)
            self._next_id += 1
            if parent is not None:
                parent.children += 1
            self._index[block.key] = block
            self._lru[block.id] = block
            path.append(block)
        self._touch(path)
        self.stats.stored_blocks += len(slots)
        return len(slots)

    def _copy_in(self, slots: list[int], first: int, cache: KVCache) -> None:
        """Copy blocks first, first+1, ... of row 0 of `cache` into `slots`."""
        if not slots:
            return
        n = self.block_tokens
        a, b = first * n, (first + len(slots)) * n
        index = torch.tensor(slots, device=self.k.device)
        for store, layers in ((self.k, cache.k), (self.v, cache.v)):
            for layer, src in enumerate(layers):
                heads, dim = src.shape[1], src.shape[3]
                # (H, blocks * n, d) -> (blocks, H, n, d)
                part = src[0, :, a:b].reshape(heads, len(slots), n, dim).transpose(0, 1)
                store[index, layer] = part.to(store.dtype)

    def _free_slot(self, protect: list[_Block]) -> int | None:
        """A free slot, made by evicting the least recently used block that no stored block
        follows (and that is not in `protect`); None when there is none to evict."""
        if self._free:
            return self._free.pop()
        guarded = {b.id for b in protect}
        for block in self._lru.values():
            if block.children == 0 and block.id not in guarded:
                self._evict(block)
                return self._free.pop()
        return None

    def _evict(self, block: _Block) -> None:
        del self._index[block.key]
        del self._lru[block.id]
        if block.parent is not None:
            block.parent.children -= 1
        self._free.append(block.slot)
        self.stats.evicted_blocks += 1

    def clear(self) -> None:
        """Forget every stored block (the counters stay)."""
        self._index.clear()
        self._lru.clear()
        self._free = list(range(self.capacity_blocks - 1, -1, -1))


def prometheus_lines(cache: PrefixCache | None) -> list[str]:
    """The prefix cache's counters as Prometheus text lines (none when there is no cache)."""
    if cache is None:
        return []
    s = cache.stats
    metrics = (
        ("queries_total", "counter", "Prompts looked up in the prefix cache.", s.queries),
        ("hits_total", "counter", "Prompts that reused cached blocks.", s.hits),
        ("query_tokens_total", "counter", "Prompt tokens looked up.", s.query_tokens),
        ("hit_tokens_total", "counter", "Prompt tokens reused, not computed.", s.hit_tokens),
        ("evicted_blocks_total", "counter", "Blocks evicted to make room.", s.evicted_blocks),
        ("tokens", "gauge", "Tokens stored now.", cache.stored_tokens),
        ("capacity_tokens", "gauge", "Tokens the prefix cache holds at most.",
         cache.capacity_tokens),
    )  # fmt: skip
    lines = []
    for name, kind, text, value in metrics:
        full = f"moekit_prefix_cache_{name}"
        lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}", f"{full} {value}"]
    return lines
