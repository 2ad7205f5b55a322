"""`moekit bench offload`: generation with the experts paged under a memory budget, against
the fully loaded model in the same run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.infer.generate import Generator
from moekit.infer.offload import OffloadConfig, load_paged_model, offload_report, plan_budget
from moekit.infer.sampling import SamplingParams
from moekit.model import meta_model
from moekit.model_dir import ModelDir, load_model

FRACTIONS = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class OffloadRow:
    """One configuration: `cache` (what the cache holds), `slots` experts per layer, the
    weights' `budget` bytes, `prefetch`, decode `tokens_per_s` and its ratio to the fully
    loaded model, the cache's `hit_rate`, `stall_s` waiting for reads, `bytes_read`,
    `prefetch_accuracy`, and whether the greedy tokens equal the loaded model's."""

    cache: str
    slots: int
    budget: int
    prefetch: bool
    tokens_per_s: float
    vs_loaded: float
    hit_rate: float | None
    stall_s: float
    bytes_read: int
    prefetch_accuracy: float | None
    same_tokens: bool


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
    rows: list[OffloadRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _decode_speed(gen: Generator, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decode speed in tokens/s (prefill excluded: timed as a separate 1-token run)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    gen.generate([prompt], one)  # warm-up: first calls pay one-time costs
    start = time.perf_counter()
    gen.generate([prompt], one)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = gen.generate([prompt], params)[0]
    decode = time.perf_counter() - start - prefill
    return (len(out.token_ids) - 1) / max(decode, 1e-9), out.token_ids


def bench_offload(
    model_dir: str | Path,
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    fractions: tuple[float, ...] = FRACTIONS,
    policy: str = "lru",
    seed: int = 0,
) -> OffloadBench:
    """Greedy generation from a random prompt of `prompt_tokens` ids, `new_tokens` new tokens:
    the fully loaded model, then the experts paged with a cache of each fraction of the
    experts (at least 1 per layer) and with a single slot per layer (nearly every expert read
    from the files at every step), each with and without prefetch. Decode tokens/s excludes
    the prompt. The weight files stay in the operating system's page cache between runs, so
    reads are copies from memory, not from the disk."""
    directory = ModelDir(model_dir)
    cfg = directory.config()
    plan = plan_budget(meta_model(cfg), 2**62)
    gen_loaded = Generator(load_model(directory.path), _tokenizer(directory))
    ids = torch.randint(
        0, cfg.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)
    )
    prompt = ids.tolist()
    loaded_speed, want = _decode_speed(gen_loaded, prompt, new_tokens)
    del gen_loaded
    experts = plan.experts_per_layer
    sizes = [(f"{f:.1%} of experts", max(1, round(f * experts))) for f in fractions]
    if all(slots > 1 for _, slots in sizes):
        sizes.append(("1 slot (no cache)", 1))
    rows = []
    for label, slots in sizes:
        budget = plan.resident + slots * sum(plan.expert.values())
        for prefetch in (False, True):
            offload = OffloadConfig(max_memory=budget, policy=policy, prefetch=prefetch)
            model = load_paged_model(directory.path, offload)
            speed, got = _decode_speed(Generator(model, _tokenizer(directory)), prompt, new_tokens)
            r = offload_report(model)
            assert r is not None
            rows.append(
                OffloadRow(
                    label, slots, budget, prefetch, speed, speed / loaded_speed, r["hit_rate"],
                    r["stall_s"], r["bytes_read"], r["prefetch_accuracy"], got == want,
                )
            )  # fmt: skip
    weights = plan.resident + experts * sum(plan.expert.values())
    return OffloadBench(
        str(model_dir), experts, len(plan.expert), weights, plan.resident, prompt_tokens,
        new_tokens, loaded_speed, rows,
    )  # fmt: skip


def _tokenizer(directory: ModelDir) -> Any:
    from moekit.data.tokenizer import Tokenizer

    return Tokenizer.load(directory.path)
