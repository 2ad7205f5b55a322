"""Prefill: a request's prompt through the model, into a KV cache of its own, a chunk at a time.

The engine runs a long prompt in chunks between the decode steps of the running requests, so
that a 4k-token prompt delays each of their tokens by one chunk's work instead of stalling
them for the whole prompt. A chunk attends to the cached keys of the chunks before it, so the
logits are those of a single pass (equal up to float rounding; tested). Once the whole prompt
is through, its cache row joins the batch.

With a prefix cache (prefix_cache.py), the first chunk starts after the longest stored start
of the prompt, copied into the request's cache; the prompt's whole blocks are stored once it
is through. The lookup waits for the first chunk, so that a request admitted with others that
share its start finds the blocks the first of them stored.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from moekit.model import Transformer
from moekit.nn.kv_cache import KVCache
from moekit.serve import replay
from moekit.serve.events import EngineRequest, TokenLogprob, prompt_logprobs
from moekit.serve.prefix_cache import PrefixCache, may_reuse, may_store

log = logging.getLogger("moekit.serve")


class Prefill:
    """The prompt of `req` on its way through `model`, holding batch slot `slot` meanwhile.
    `advance` runs the next chunk; once `finished`, `logits` are those of the first new token
    and `echo` holds the prompt's logprobs when the request asked for them (the first None).
    With `prefix`, the prompt starts after its cached blocks and leaves its own there."""

    def __init__(
        self,
        req: EngineRequest,
        slot: int,
        model: Transformer,
        tokenizer: Any,
        dtype: torch.dtype,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.req, self.slot = req, slot
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.cfg, 1, len(req.prompt_ids), device=self.device, dtype=dtype)
        self.done = 0  # prompt tokens through the model so far
        self.echo: list[TokenLogprob | None] = [None]
        self.logits: Tensor | None = None
        self.prefix = prefix

    @property
    def finished(self) -> bool:
        return self.done == len(self.req.prompt_ids)

    @torch.no_grad()
    def advance(self, budget: int) -> int:
        """Run the next `budget` prompt tokens (0: all that are left); returns how many ran."""
        ids = self.req.prompt_ids
        if self.done == 0 and self.prefix is not None and may_reuse(self.req):
            self.done = self.prefix.load(ids, self.req.params.experts_per_token, self.cache)
            self.req.cached_tokens = self.done
        end = len(ids) if budget <= 0 else min(len(ids), self.done + budget)
        out = self.model(
            torch.tensor([ids[self.done : end]], device=self.device),
            cache=self.cache,
            causal_routing=True,
            top_k=self.req.params.experts_per_token,
            routing_stats=False,
            return_routing=self.req.return_routed_experts,
            **replay.chunk_replay(self.req, self.done, end),
        )
        replay.record(self.req, out, 0, end - self.done)
        logits = out.logits[0]  # (n, V) in the model's dtype
        if self.req.echo_logprobs:
            # Row i scores the token after it; the last row of the prompt scores none.
            targets = ids[self.done + 1 : end + 1]
            top = self.req.logprobs or 0
            self.echo += prompt_logprobs(self.tokenizer, logits[: len(targets)], targets, top)
        ran, self.done = end - self.done, end
        if self.finished:
            self.logits = logits[-1].float()
            if self.prefix is not None and may_store(self.req):
                try:
                    self.prefix.store(ids, self.req.params.experts_per_token, self.cache)
                except Exception:  # this request has its logits; others lose a cache hit
                    log.exception("storing a prompt's blocks in the prefix cache failed")
        return ran
