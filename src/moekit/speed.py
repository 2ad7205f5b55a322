"""Decode speed from first principles: the bytes a decode step reads, the memory bandwidth of
this machine, and the tokens/s bound they give.

Decoding one token touches every resident weight it uses once: attention, norms, router and
shared experts of every layer, the embedding row of the token, the LM head, the top-k routed
experts the router picked in each MoE layer, and the KV cache over the context. When the
weights do not fit in the CPU's caches, reading them from memory is the floor of a decode
step's time, so `bandwidth / bytes_per_token` bounds the tokens/s. A small model is bound
by the fixed cost of its PyTorch calls instead, and stays well below the bound.

`predict_decode` is the one place the prediction is made. Its `expert_hit_rate` and
`miss_bandwidth` arguments are where a budget that keeps only part of the experts in memory
plugs in: the missed experts' bytes are read at the slower bandwidth of wherever they live.
`expected_hit_rate` is the hit rate such a budget gives under uniform routing, and
`measure_read_bandwidth` the speed at which a miss reads an expert from a weight file.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from moekit.config import ModelConfig
from moekit.params import (
    attention_params,
    count_params,
    kv_cache_elements_per_token,
    mlp_params,
)


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads, by part, for `batch` sequences at `context` cached
    positions each. `routed_experts` counts the distinct experts the step touches (at batch
    1 exactly the top-k per MoE layer)."""

    batch: int
    context: int
    by_part: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_part.values())

    @property
    def per_token(self) -> float:
        return self.total / self.batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "context": self.context,
            "bytes_per_step": self.total,
            "bytes_per_token": self.per_token,
            "by_part": dict(self.by_part),
        }


def expected_distinct(num_experts: int, top_k: float, batch: int) -> float:
    """Experts a batch of `batch` tokens touches in one MoE layer when each token picks
    `top_k` of `num_experts` uniformly at random (the real number depends on the routing;
    at batch 1 it is exactly `top_k`)."""
    if batch == 1:
        return float(top_k)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def step_bytes(
    cfg: ModelConfig, *, batch: int = 1, context: int = 128, bytes_per_weight: float = 4.0
) -> StepBytes:
    """The bytes one decode step of `batch` tokens reads from memory (see `StepBytes`), for
    weights of `bytes_per_weight` bytes (4: float32) and a float32 KV cache. The weights a
    config's `quantization` covers count as stored: int8 one byte plus a float32 scale per
    output channel, int4 half a byte plus a float32 scale and minimum per group."""
    d = cfg.dim
    bpw = expert_bpw = bytes_per_weight
    q = cfg.quantization
    if q is not None:
        expert_bpw = 1.0 + 4.0 / d if q.bits == 8 else 0.5 + 8.0 / (q.group_size or 32)
        if q.parts == "all":
            bpw = expert_bpw
    parts = dict.fromkeys(
        ("embeddings", "attention", "norms", "router", "shared_experts", "dense_mlp"), 0.0
    )
    parts["routed_experts"] = 0.0
    parts["embeddings"] = batch * d * bpw  # one row per token
    head = cfg.vocab_size * d * bpw
    parts["lm_head"] = head
    parts["attention"] = cfg.num_layers * attention_params(cfg) * bpw
    parts["norms"] = count_params(cfg).total_by["norms"] * bpw
    moe = cfg.moe
    for layer in range(cfg.num_layers):
        if moe is None or not moe.is_moe_layer(layer):
            parts["dense_mlp"] += mlp_params(cfg, cfg.dense_hidden) * bpw
            continue
        k = moe.top_k
        if moe.router == "expert_choice":  # decoding routes it causally: ceil(factor) each
            k = min(moe.num_experts, math.ceil(moe.capacity_factor or 1.0))
        distinct = expected_distinct(moe.num_experts, k, batch)
        parts["routed_experts"] += distinct * mlp_params(cfg, moe.expert_hidden) * expert_bpw
        parts["router"] += moe.num_experts * d * 4  # routers stay float32
        if moe.num_shared_experts:
            parts["shared_experts"] += mlp_params(cfg, moe.shared_hidden_total) * bpw
    parts["kv_cache"] = batch * context * kv_cache_elements_per_token(cfg) * 4
    return StepBytes(batch, context, {k: round(v) for k, v in parts.items()})


READER_BYTES = 256 * 2**20  # what `measure_bandwidth` reads by default


def measure_bandwidth(size_mib: int = READER_BYTES >> 20, repeats: int = 5) -> float:
    """Memory read bandwidth of this machine in bytes/s: the fastest of `repeats` reads of a
    `size_mib` MiB float32 tensor (large enough to miss every CPU cache) with PyTorch's own
    threads, each read made twice, as a sum and as a matrix-vector product (the library's,
    as a decode step reads large weights). Which reader is faster depends on the CPU (on an
    AVX-512 Xeon the product read 1.2-1.3x faster than the sum); the faster is the stricter
    bound. The tensor is freed on return."""
    import torch

    x = torch.ones(size_mib * 2**20 // 4)
    v = torch.ones(1024)
    x.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        for read in (x.sum, lambda: torch.mv(x.view(-1, 1024), v)):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def measure_read_bandwidth(
    path: str | os.PathLike[str] | None = None,
    *,
    size_mib: int = 64,
    chunk_bytes: int = 2**20,
    repeats: int = 3,
) -> float:
    """File read bandwidth in bytes/s, as an expert cache's misses see it: the best of
    `repeats` passes reading the first `size_mib` MiB of `path` (a weight file) in reads of
    `chunk_bytes` (a miss reads each projection of an expert in one read) into one buffer.
    The first pass brings the bytes into the operating system's page cache, so this is the
    speed of a warm read (a copy from memory plus a system call per read); a file read cold
    from the disk is slower. Without `path`, a temporary file
    of `size_mib` MiB is written and read."""
    if path is None:
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"\0" * (size_mib * 2**20))
            f.flush()
            return measure_read_bandwidth(
                f.name, size_mib=size_mib, chunk_bytes=chunk_bytes, repeats=repeats
            )
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(os.fstat(fd).st_size, size_mib * 2**20)
        if size == 0:
            raise ValueError(f"{path} is empty: there is nothing to time reads of")
        chunk = min(max(1, chunk_bytes), size)
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass fills the page cache
            t0 = time.perf_counter()
            for offset in range(0, size - chunk + 1, chunk):
                os.preadv(fd, [view], offset)
            best = min(best, time.perf_counter() - t0)
    finally:
        os.close(fd)
    return (size // chunk) * chunk / best


def expected_hit_rate(slots: int, experts: int) -> float:
    """The share of the experts a decode step needs that a cache of `slots` experts per layer
    (of `experts`) already holds, when every token picks its experts uniformly at random,
    independently of the tokens before: whichever experts the cache keeps, a needed one is
    among them with chance slots / experts (1.0 once every expert fits). Trained routers are
    skewed towards a few experts and consecutive tokens share experts, so LRU or LFU caches
    of trained models hit more often than this; random weights come close to it."""
    if experts <= 0 or slots <= 0:
        raise ValueError(f"slots={slots} and experts={experts} must be positive")
    return min(1.0, slots / experts)


@dataclass(frozen=True)
class SpeedPrediction:
    """A decode tokens/s prediction: the bytes per token, the bandwidth it is read at, and
    the expert hit rate assumed (1.0: every expert resident)."""

    bytes: StepBytes
    bandwidth: float  # bytes/s of memory
    expert_hit_rate: float
    miss_bandwidth: float | None
    tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.bytes.to_dict(),
            "bandwidth_bytes_per_s": self.bandwidth,
            "expert_hit_rate": self.expert_hit_rate,
            "miss_bandwidth_bytes_per_s": self.miss_bandwidth,
            "predicted_tokens_per_s": self.tokens_per_s,
        }


def predict_decode(
    cfg: ModelConfig,
    bandwidth: float,
    *,
    batch: int = 1,
    context: int = 128,
    bytes_per_weight: float = 4.0,
    expert_hit_rate: float = 1.0,
    miss_bandwidth: float | None = None,
) -> SpeedPrediction:
    """Decode tokens/s bound for `cfg` on a machine reading memory at `bandwidth` bytes/s.

    Every byte of `step_bytes` is read from memory once per step. With `expert_hit_rate`
    below 1 (experts kept under a memory budget), that fraction of the routed experts' bytes
    is found in memory and the rest is read first at `miss_bandwidth` bytes/s (a disk or page
    cache) and then from memory as well.
    """
    if not 0.0 <= expert_hit_rate <= 1.0:
        raise ValueError(f"expert_hit_rate={expert_hit_rate} must be in [0, 1]")
    if bandwidth <= 0:
        raise ValueError(f"bandwidth={bandwidth} must be positive")
    sb = step_bytes(cfg, batch=batch, context=context, bytes_per_weight=bytes_per_weight)
    seconds = sb.total / bandwidth
    if expert_hit_rate < 1.0:
        if miss_bandwidth is None or miss_bandwidth <= 0:
            raise ValueError("an expert hit rate below 1 needs the bandwidth misses are read at")
        seconds += (1.0 - expert_hit_rate) * sb.by_part["routed_experts"] / miss_bandwidth
    return SpeedPrediction(sb, bandwidth, expert_hit_rate, miss_bandwidth, batch / seconds)
