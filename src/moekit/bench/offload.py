"""`moekit bench offload`: generation with the experts paged under a memory budget, against
the fully loaded model in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.bench.pagecache import cached_fraction, drop_from_page_cache
from moekit.infer.generate import Generator
from moekit.infer.offload import (
    OffloadConfig,
    load_paged_model,
    offload_report,
    pager_of,
    plan_budget,
)
from moekit.infer.sampling import SamplingParams
from moekit.model_dir import ModelDir, load_model
from moekit.quant.build import meta_model  # counts quantised experts as stored
from moekit.speed import (
    expected_hit_rate,
    measure_bandwidth,
    measure_read_bandwidth,
    predict_decode,
)

FRACTIONS = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class OffloadRow:
    """One configuration: `cache` (what the cache holds), `slots` experts per layer, the
    weights' `budget` bytes, `prefetch`, decode `tokens_per_s`, the fully loaded model's
    (`loaded_tokens_per_s`, timed in turn with it) and the ratio of the two (`vs_loaded`),
    the cache's `hit_rate`, `stall_s` waiting for reads, `bytes_read`, `prefetch_accuracy`
    (these over the last timed generation), and whether the greedy tokens equal the loaded
    model's. `expected_hit_rate` and `predicted_tokens_per_s` are what `moekit info --speed
    --max-memory` predicts for this budget, `predicted_vs_loaded` that prediction over the
    one for the loaded model, and `calibrated_tokens_per_s` the measured loaded speed slowed
    by the time the prediction gives the misses (for models that per-call overhead, not
    memory bandwidth, keeps below the bound). `page_cache`: the share of the weight files the
    operating system held in its page cache when the last timed generation began (None:
    unknown); after a drop (`cold`) it is near 0 and the first read of each expert comes from
    the disk."""

    cache: str
    slots: int
    budget: int
    prefetch: bool
    tokens_per_s: float
    loaded_tokens_per_s: float
    vs_loaded: float
    hit_rate: float | None
    stall_s: float
    bytes_read: int
    prefetch_accuracy: float | None
    same_tokens: bool
    expected_hit_rate: float
    predicted_tokens_per_s: float
    predicted_vs_loaded: float
    calibrated_tokens_per_s: float
    cold: bool
    page_cache: float | None


@dataclass(frozen=True)
class OffloadBench:
    model: str
    experts_per_layer: int
    moe_layers: int
    weights_bytes: int
    resident_bytes: int
    prompt_tokens: int
    new_tokens: int
    loaded_tokens_per_s: float
    bandwidth: float
    read_bandwidth: float
    loaded_predicted_tokens_per_s: float
    rows: list[OffloadRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


Candidate = tuple[Generator, Callable[[], object]]  # a generator, what runs before its timings


def _decode_speeds(
    candidates: list[Candidate], prompt: list[int], new_tokens: int, repeats: int = 1
) -> list[tuple[float, list[int]]]:
    """Greedy decode speed in tokens/s of each candidate, and its tokens: the best of
    `repeats` whole generations less the best of `repeats` 1-token ones (the prefill), the
    candidates taken in turn in each repeat (so load on a shared machine falls on all alike).
    A candidate's `before` runs ahead of each of its timed runs (outside the timing); a paged
    model's cache metrics are reset before each whole generation, so they cover the last."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    for gen, _ in candidates:
        gen.generate([prompt], one)  # warm-up: first calls pay one-time costs
    prefill = [float("inf")] * len(candidates)
    whole = [float("inf")] * len(candidates)
    tokens: list[list[int]] = [[] for _ in candidates]
    for _ in range(repeats):
        for i, (gen, before) in enumerate(candidates):
            before()
            start = time.perf_counter()
            gen.generate([prompt], one)
            prefill[i] = min(prefill[i], time.perf_counter() - start)
            before()
            pager = pager_of(gen.model)
            if pager is not None:
                pager.reset_metrics()
            start = time.perf_counter()
            tokens[i] = gen.generate([prompt], params)[0].token_ids
            whole[i] = min(whole[i], time.perf_counter() - start)
    return [
        ((len(t) - 1) / max(w - p, 1e-9), t) for t, w, p in zip(tokens, whole, prefill, strict=True)
    ]


def bench_offload(
    model_dir: str | Path,
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    fractions: tuple[float, ...] = FRACTIONS,
    policy: str = "lru",
    cold: bool = False,
    repeats: int = 1,
    seed: int = 0,
) -> OffloadBench:
    """Greedy generation from a random prompt of `prompt_tokens` ids, `new_tokens` new tokens:
    the fully loaded model, then the experts paged with a cache of each fraction of the
    experts (at least 1 per layer) and with a single slot per layer (nearly every expert read
    from the files at every step), each with and without prefetch; the loaded model is timed
    again in turn with each of them, and each ratio is to that figure. Decode tokens/s
    excludes the prompt and keeps the best of `repeats` (see `_decode_speeds`); hit rate, stall and
    bytes read cover the last timed generation (prompt and decoding). Each paged row also
    shows what `moekit info --speed --max-memory` predicts (uniform routing, this run's
    memory and file read bandwidths).

    By default the weight files stay in the operating system's page cache, so a miss is a copy
    from memory. With `cold`, the files are dropped from the page cache before each timed run,
    so the first read of each expert in it comes from the disk (later reads of that expert
    find it in the page cache again)."""
    directory = ModelDir(model_dir)
    cfg = directory.config()
    plan = plan_budget(meta_model(cfg), 2**62)
    files = directory.weight_files()
    gen_loaded = Generator(load_model(directory.path), _tokenizer(directory))
    ids = torch.randint(
        0, cfg.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)
    )
    prompt = ids.tolist()
    [(loaded_speed, _)] = _decode_speeds([(gen_loaded, lambda: None)], prompt, new_tokens,
                                         repeats)  # fmt: skip
    bandwidth, read_bandwidth = (
        measure_bandwidth(),
        measure_read_bandwidth(
            max(files, key=lambda f: f.stat().st_size), chunk_bytes=max(plan.expert.values()) // 3
        ),
    )
    context = prompt_tokens + new_tokens // 2

    def predict(slots: int) -> tuple[float, float]:
        hit = expected_hit_rate(slots, plan.experts_per_layer)
        p = predict_decode(cfg, bandwidth, context=context, expert_hit_rate=hit,
                           miss_bandwidth=read_bandwidth if hit < 1 else None)  # fmt: skip
        return hit, p.tokens_per_s

    loaded_predicted = predict(plan.experts_per_layer)[1]
    experts = plan.experts_per_layer
    sizes = [(f"{f:.1%} of experts", max(1, round(f * experts))) for f in fractions]
    if all(slots > 1 for _, slots in sizes):
        sizes.append(("1 slot (no cache)", 1))
    setting = _Setting(directory, files, prompt, new_tokens, repeats, policy, cold, gen_loaded)
    rows = []
    for label, slots in sizes:
        budget = plan.resident + slots * sum(plan.expert.values())
        hit, predicted = predict(slots)
        for prefetch in (False, True):
            row = _paged_row(setting, label, slots, budget, prefetch)
            miss_s = 1 / predicted - 1 / loaded_predicted
            calibrated = 1 / (1 / row["loaded_tokens_per_s"] + miss_s)
            rows.append(
                OffloadRow(**row, expected_hit_rate=hit, predicted_tokens_per_s=predicted,
                           predicted_vs_loaded=predicted / loaded_predicted,
                           calibrated_tokens_per_s=calibrated)
            )  # fmt: skip
    weights = plan.resident + experts * sum(plan.expert.values())
    return OffloadBench(
        str(model_dir), experts, len(plan.expert), weights, plan.resident, prompt_tokens,
        new_tokens, loaded_speed, bandwidth, read_bandwidth, loaded_predicted, rows,
    )  # fmt: skip


@dataclass(frozen=True)
class _Setting:
    """What every paged row of one `bench_offload` run shares."""

    directory: ModelDir
    files: list[Path]
    prompt: list[int]
    new_tokens: int
    repeats: int
    policy: str
    cold: bool
    loaded: Generator  # timed in turn with each paged model


def _paged_row(s: _Setting, label: str, slots: int, budget: int, prefetch: bool) -> dict[str, Any]:
    """The measured fields of one `OffloadRow`."""
    offload = OffloadConfig(max_memory=budget, policy=s.policy, prefetch=prefetch)
    model = load_paged_model(s.directory.path, offload)
    seen: list[float | None] = []

    def before() -> None:
        if s.cold:
            drop_from_page_cache(s.files)
        seen.append(cached_fraction(s.files))

    gen = Generator(model, _tokenizer(s.directory))
    candidates: list[Candidate] = [(gen, before), (s.loaded, lambda: None)]
    (speed, got), (loaded, want) = _decode_speeds(candidates, s.prompt, s.new_tokens, s.repeats)
    r = offload_report(model)
    assert r is not None
    return dict(
        cache=label, slots=slots, budget=budget, prefetch=prefetch, tokens_per_s=speed,
        loaded_tokens_per_s=loaded, vs_loaded=speed / loaded, hit_rate=r["hit_rate"],
        stall_s=r["stall_s"], bytes_read=r["bytes_read"],
        prefetch_accuracy=r["prefetch_accuracy"], same_tokens=got == want, cold=s.cold,
        page_cache=seen[-1],
    )  # fmt: skip


def _tokenizer(directory: ModelDir) -> Any:
    from moekit.data.tokenizer import Tokenizer

    return Tokenizer.load(directory.path)
