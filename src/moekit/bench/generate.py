"""`moekit bench generate`: prefill and decode speed of our generator against transformers'
`generate` on the same weights (copied into a MixtralForCausalLM), timed round-robin.

Both sides decode greedily with a KV cache, never stopping early. Prefill throughput is the
prompt tokens over the time to produce the first new token; decode throughput is the further
new tokens over the remaining time. The generated tokens are compared as a sanity check.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.interop.mixtral import to_hf_model


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_generate(
    model_dir: str | Path | None = None,
    *,
    preset: str = "demo",
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ours and transformers' greedy generation of `new_tokens` after a random prompt of
    `prompt_tokens` tokens, for `batch_size` prompts at once.

    The model is `model_dir`'s (or a randomly initialised `preset`). Returns prefill and decode
    tokens/s for each side, their ratios (> 1: ours is faster) and whether both generated the
    same tokens.
    """
    from moekit.model import build_model
    from moekit.presets import get_preset

    if model_dir is not None:
        generator = Generator.from_dir(model_dir)
    else:
        from moekit.data.tokenizer import Tokenizer

        cfg = get_preset(preset)
        tokenizer = Tokenizer.train(["a b c"], 300)  # only its pad/eos ids are used
        generator = Generator(build_model(cfg, seed=seed), tokenizer)
    model, cfg = generator.model, generator.model.cfg
    hf = to_hf_model(model, cfg)
    if prompt_tokens + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    torch.manual_seed(seed)
    low = 2  # skip the special tokens
    prompts = torch.randint(low, cfg.vocab_size, (batch_size, prompt_tokens))
    batch = [row.tolist() for row in prompts]

    def ours(n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        return [c.token_ids for c in generator.generate(batch, params)]

    def theirs(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,  # never stop early, as ours with ignore_eos
                pad_token_id=generator.tokenizer.pad_id,
            )
        return out[:, prompt_tokens:].tolist()

    same_tokens = ours(new_tokens) == theirs(new_tokens)
    samples: dict[str, list[float]] = {k: [] for k in ("ours_1", "ours_n", "hf_1", "hf_n")}
    for _ in range(repeats):  # round-robin so both see the same machine state
        samples["ours_1"].append(_timed(lambda: ours(1)))
        samples["hf_1"].append(_timed(lambda: theirs(1)))
        samples["ours_n"].append(_timed(lambda: ours(new_tokens)))
        samples["hf_n"].append(_timed(lambda: theirs(new_tokens)))
    t = {k: statistics.median(v) for k, v in samples.items()}
    prompt_total, decode_total = batch_size * prompt_tokens, batch_size * (new_tokens - 1)
    result = {
        "model": str(model_dir) if model_dir else f"{preset} (random weights)",
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "ours_prefill_tokens_per_s": prompt_total / t["ours_1"],
        "hf_prefill_tokens_per_s": prompt_total / t["hf_1"],
        "ours_decode_tokens_per_s": decode_total / max(t["ours_n"] - t["ours_1"], 1e-9),
        "hf_decode_tokens_per_s": decode_total / max(t["hf_n"] - t["hf_1"], 1e-9),
        "same_tokens": same_tokens,
        "hf_experts_implementation": hf.config._experts_implementation,
    }
    result["prefill_ours_over_hf"] = (
        result["ours_prefill_tokens_per_s"] / result["hf_prefill_tokens_per_s"]
    )
    result["decode_ours_over_hf"] = (
        result["ours_decode_tokens_per_s"] / result["hf_decode_tokens_per_s"]
    )
    return result
