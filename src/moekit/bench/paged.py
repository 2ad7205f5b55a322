"""`moekit bench generate MODEL_DIR --max-memory SIZE`: our generation with the routed experts
paged under a memory budget, measured beside what `moekit info --speed --max-memory` predicts
for the same budget (decode tokens/s and the expert cache's hit rate).

Only our side runs: holding transformers' copy of the model would need every expert in
memory, which is what the budget is there to avoid.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from moekit.bench.generate import ids_tokenizer
from moekit.bench.hostile import peak_resident_bytes, resident_bytes
from moekit.bench.timing import round_robin
from moekit.infer.generate import Generator
from moekit.infer.offload import BudgetPlan, OffloadConfig, offload_report, pager_of
from moekit.infer.sampling import SamplingParams
from moekit.model_dir import ModelDir
from moekit.speed import (
    SpeedPrediction,
    expected_hit_rate,
    measure_bandwidth,
    measure_read_bandwidth,
    predict_decode,
)


@dataclass(frozen=True)
class PagedGenerateBench:
    """What `bench_generate_paged` measured: the setting, prefill and decode tokens/s (best of
    the repeats), the expert cache's hit rate while decoding beside the uniform-routing
    figure the prediction assumes, the prediction, and the offload report of one whole
    generation (budget plan, hit rate, bytes read, stalls, prefetch accuracy, per layer)."""

    model: str
    max_memory: int
    sampled: bool
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_hit_rate: float | None
    expected_hit_rate: float
    prediction: SpeedPrediction
    offload: dict[str, Any]
    baseline_rss: int  # resident bytes before loading (the runtime)
    peak_rss: int  # the process's peak resident bytes, loading included

    @property
    def measured_over_predicted(self) -> float:
        return self.decode_tokens_per_s / self.prediction.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_memory": self.max_memory,
            "sampled": self.sampled,
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ours_prefill_tokens_per_s": self.prefill_tokens_per_s,
            "ours_decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_hit_rate": self.decode_hit_rate,
            "expected_hit_rate": self.expected_hit_rate,
            "prediction": self.prediction.to_dict(),
            "measured_over_predicted": self.measured_over_predicted,
            "offload": self.offload,
            "baseline_rss_bytes": self.baseline_rss,
            "peak_rss_bytes": self.peak_rss,
        }


def bench_generate_paged(
    model_dir: str | Path,
    offload: OffloadConfig,
    *,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
    sample: bool = False,
) -> PagedGenerateBench:
    """Time our greedy generation of `new_tokens` after random prompts of `prompt_tokens`
    tokens (`batch_size` at once) with `model_dir`'s routed experts paged as `offload` says
    (budget, cache policy, prefetch), the best of `repeats`. Prefill is the time to the first
    new token, decoding the rest. The decode hit rate is the cache's hits and misses of a
    whole generation less those of a 1-token one (the prompt) from the same cache state.
    Beside it: the prediction of `moekit info --speed --max-memory`. `sample`: sample the
    new tokens (temperature 1, a new seed each generation) instead of choosing greedily: greedy
    decoding of random weights tends to repeat a token, and with it its experts, which flatters
    the cache; sampled tokens vary as text does (a random router may still concentrate them
    on a few experts)."""
    directory = ModelDir(model_dir)
    baseline = resident_bytes()
    generator = _paged_generator(directory, offload)
    cfg, model = generator.model.cfg, generator.model
    if prompt_tokens + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    torch.manual_seed(seed)
    prompts = [
        row.tolist() for row in torch.randint(2, cfg.vocab_size, (batch_size, prompt_tokens))
    ]

    greedy = _generation(generator, prompts, sample=sample, seed=seed)
    greedy(2)  # warm-up: a prefill and a decode step (kernels compile on first use)
    bandwidth = measure_bandwidth()  # and again after: the higher (see bench.generate)
    t = {name: min(ts) for name, ts in round_robin(
        {"one": lambda: greedy(1), "all": lambda: greedy(new_tokens)}, repeats
    ).items()}  # fmt: skip
    prompt_counts = _counted(model, lambda: greedy(1))
    whole = _counted(model, lambda: greedy(new_tokens))
    report = offload_report(model)
    assert report is not None
    hits, misses = (w - p for w, p in zip(whole, prompt_counts, strict=True))
    plan = cast(BudgetPlan, model.offload_plan)
    expected = expected_hit_rate(plan.slots, plan.experts_per_layer)
    expert_file = max(directory.weight_files(), key=lambda f: f.stat().st_size)
    prediction = predict_decode(
        cfg,
        max(bandwidth, measure_bandwidth()),
        batch=batch_size,
        context=prompt_tokens + new_tokens // 2,
        expert_hit_rate=expected,
        miss_bandwidth=None if expected >= 1.0 else measure_read_bandwidth(
            expert_file, chunk_bytes=max(plan.expert.values()) // 3
        ),
    )  # fmt: skip
    return PagedGenerateBench(
        model=str(model_dir),
        max_memory=offload.max_memory,
        sampled=sample,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_tokens_per_s=batch_size * prompt_tokens / t["one"],
        decode_tokens_per_s=batch_size * (new_tokens - 1) / max(t["all"] - t["one"], 1e-9),
        decode_hit_rate=hits / (hits + misses) if hits + misses > 0 else None,
        expected_hit_rate=expected,
        prediction=prediction,
        offload=report,
        baseline_rss=baseline,
        peak_rss=peak_resident_bytes(),
    )


def _generation(
    generator: Generator, prompts: list[list[int]], *, sample: bool, seed: int
) -> Callable[[int], None]:
    """`run(n)`: generate `n` tokens after `prompts`, greedily or sampled (temperature 1,
    each call with its own seed)."""
    calls = itertools.count(seed)

    def run(n: int) -> None:
        params = SamplingParams(
            temperature=1.0 if sample else 0.0, max_new_tokens=n, ignore_eos=True,
            seed=next(calls),
        )  # fmt: skip
        generator.generate(prompts, params)

    return run


def _paged_generator(directory: ModelDir, offload: OffloadConfig) -> Generator:
    """The directory's generator; a directory without a tokenizer (`moekit quantize --preset`
    writes none) gets one that only supplies the special ids: the bench feeds token ids."""
    if any(directory.tokenizer_files()):
        return Generator.from_dir(directory.path, offload=offload)
    from moekit.infer.offload import load_paged_model

    return Generator(load_paged_model(directory.path, offload), ids_tokenizer())


def _counted(model: Any, run: Any) -> tuple[int, int]:
    """The cache's hits and misses, over every MoE layer, while `run()` runs."""
    pager = pager_of(model)
    assert pager is not None
    pager.reset_metrics()
    run()
    for layer in pager.layers.values():
        layer.wait()  # a prefetch still reading counts too
    layers = pager.metrics()
    return sum(m.hits for m in layers), sum(m.misses for m in layers)
