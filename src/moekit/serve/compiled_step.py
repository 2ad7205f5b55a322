"""The serving engine's decode step through `torch.compile` (`moekit serve --compile`).

The engine decodes one token for each of its first B slots per step. Eagerly that step is a
few hundred small PyTorch calls; compiled (moekit.infer.compiled) it is a few dozen, which
on a small model is most of the step's time. A compiled graph has fixed shapes, so:

- the rows are padded to a batch size out of a few (1, 2, 4, ... up to `max_batch`); padded
  rows are idle: they neither grow nor count;
- every step attends over the cache's whole length (the server's `max_context`), under the
  mask of each row's real positions;
- each batch size is compiled once, by `warm_up` before the server takes requests (or on the
  first step that needs it).

A step goes through the graph only when it is the plain case the graph computes exactly:
one token per slot (no speculative drafts), every request with the model's own number of
experts per token, and no routing replay; any other step, and every step of a model the
compiled step does not cover (`moekit.infer.compiled.decode_support`), runs eagerly. The
graph also returns each MoE layer's routing, so routing traces, /metrics and recorded
routing read the same as eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from moekit.infer.compiled import CompiledDecoder, LayerRouting
from moekit.model import ModelOutput, Transformer
from moekit.moe.layer import MoEStats
from moekit.moe.router import RouterOutput
from moekit.nn.kv_cache import KVCache


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes compiled for `max_batch` slots: powers of two below it, and itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


class CompiledSteps:
    """The engine's compiled decode step over its batched KV cache `cache`."""

    def __init__(self, model: Transformer, cache: KVCache, pad_id: int) -> None:
        self.model, self.cache, self.pad_id = model, cache, pad_id
        self.decoder = CompiledDecoder(model)
        self.sizes = batch_sizes(cache.batch)
        self.moe_layers = sorted(model.moe_layers())
        self.steps = 0  # decode steps that went through the graph

    @property
    def reason(self) -> str | None:
        """Why the model decodes eagerly (None: it compiles)."""
        if self.decoder.failed:
            return "torch.compile failed (see the warning logged)"
        return self.decoder.reason

    @torch.no_grad()  # as the engine's steps run (a graph is compiled per grad mode)
    def warm_up(self, say: Callable[[str], None] | None = None) -> None:
        """Compile the step for every batch size now (each takes seconds to a minute on a
        small CPU; torch's on-disk cache makes a later start quicker). Every row is idle, so
        the cache is left as it was; call it while no request is being decoded (before the
        server takes requests, as `moekit serve` does), since it steps the engine's cache."""
        for size in self.sizes:
            if self.reason is not None:
                break
            t0 = time.perf_counter()
            tokens = torch.full((size, 1), self.pad_id, dtype=torch.long, device=self.device)
            idle = torch.zeros(size, 1, dtype=torch.bool, device=self.device)
            self._run(tokens, idle)
            if say is not None and self.reason is None:
                say(f"compiled the decode step for {size} rows ({time.perf_counter() - t0:.1f} s)")
        if say is not None and self.reason is not None:
            say(f"compiled decoding is off: {self.reason}; decoding eagerly")

    @property
    def device(self) -> torch.device:
        return self.cache.end.device

    def step(self, tokens_B1: Tensor, fed_B1: Tensor) -> ModelOutput | None:
        """The decode step of the first B slots (`tokens_B1`, `fed_B1` as the engine feeds
        the eager model) through the graph, as a ModelOutput with each MoE layer's routing;
        None when the compiled step is off (the engine then runs the model eagerly)."""
        if self.reason is not None:
            return None
        B = tokens_B1.shape[0]
        size = next(s for s in self.sizes if s >= B)
        if size > B:  # idle rows up to the compiled size
            extra = size - B
            pad = torch.full((extra, 1), self.pad_id, dtype=torch.long, device=self.device)
            tokens_B1 = torch.cat([tokens_B1, pad])
            fed_B1 = torch.cat([fed_B1, torch.zeros(extra, 1, dtype=torch.bool, device=pad.device)])
        out = self._run(tokens_B1, fed_B1)
        if out is None:
            return None
        logits, routes = out
        self.steps += 1
        stats = {
            layer: _stats(decision, counts, entropy, B)
            for layer, (decision, counts, entropy) in zip(self.moe_layers, routes, strict=True)
        }
        zero = torch.zeros((), device=logits.device)
        return ModelOutput(logits[:B, None, :], zero, stats)

    def _run(self, tokens_B1: Tensor, fed_B1: Tensor) -> tuple[Tensor, list[LayerRouting]] | None:
        size, c = tokens_B1.shape[0], self.cache
        out = self.decoder.run(
            tokens_B1,
            [k[:size] for k in c.k],
            [v[:size] for v in c.v],
            c.valid[:size],
            c.end[:size],
            fed_B1[:, 0],
            None,
            routing=True,
        )
        assert out is None or isinstance(out, tuple)
        return out


def _stats(decision: RouterOutput, counts: Tensor, entropy: Tensor, rows: int) -> MoEStats:
    """One MoE layer's statistics of a compiled step, for its first `rows` rows (decoding
    drops nothing and computes no losses)."""
    zero = torch.zeros((), device=counts.device)
    routing = RouterOutput(decision.weights[:rows], decision.experts[:rows], decision.logits[:rows])
    return MoEStats(counts, zero.long(), zero, zero, entropy, routing)
