"""`moekit bench generate --speculative`: greedy decoding with and without speculative decoding
on the same model and prompt, timed round-robin in one run.

Besides tokens/s, it reports how often the drafts were accepted, how many tokens each forward
pass of the model produced, and the cost an MoE adds to verification: the distinct experts
per MoE layer that a verify pass (the last token and k drafts) routes to, against the experts
one token routes to (what a plain decode step reads). On a machine where decoding is bound by
reading expert weights, a verify pass costs about as much more as the experts it touches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.bench.generate import ids_tokenizer
from moekit.bench.timing import round_robin
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.infer.speculative import SpeculativeConfig, SpeculativeStats, Speculator


@dataclass(frozen=True)
class SpeculativeBench:
    """What `bench_speculative` measured. Decode tokens/s count the new tokens after the
    first over the time after the prefill; `same_tokens` says whether both gave the same
    greedy output (they must)."""

    model: str
    prompt: str  # where the prompt came from
    method: str
    draft: str | None
    num_draft_tokens: int
    prompt_tokens: int
    new_tokens: int
    plain_tokens_per_s: float
    speculative_tokens_per_s: float
    same_tokens: bool
    acceptance_rate: float
    tokens_per_pass: float  # new tokens per forward pass of the model (plain decoding: 1)
    num_experts: int | None  # routed experts per MoE layer (None: a dense model)
    experts_single: float  # distinct experts per MoE layer of one token
    experts_verify: float  # distinct experts per MoE layer of one verify pass
    decode_pass_s: float  # one forward pass of one token through the KV cache
    verify_pass_s: float  # one forward pass of K + 1 tokens through the KV cache

    @property
    def verify_cost(self) -> float:
        """A verify pass's time over a one-token pass's: speculation gains when a pass yields
        more tokens than this (`tokens_per_pass`), less the drafting's own cost."""
        return self.verify_pass_s / self.decode_pass_s

    @property
    def speedup(self) -> float:
        """> 1: speculative decoding is faster."""
        return self.speculative_tokens_per_s / self.plain_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "method": self.method,
            "draft": self.draft,
            "num_draft_tokens": self.num_draft_tokens,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "plain_decode_tokens_per_s": self.plain_tokens_per_s,
            "speculative_decode_tokens_per_s": self.speculative_tokens_per_s,
            "speedup": self.speedup,
            "same_tokens": self.same_tokens,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_pass": self.tokens_per_pass,
            "num_experts": self.num_experts,
            "experts_per_layer_single_token": self.experts_single,
            "experts_per_layer_verify_pass": self.experts_verify,
            "decode_pass_s": self.decode_pass_s,
            "verify_pass_s": self.verify_pass_s,
            "verify_cost": self.verify_cost,
        }


def bench_speculative(
    model_dir: str | Path | None = None,
    *,
    config: SpeculativeConfig,
    preset: str = "demo",
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
) -> SpeculativeBench:
    """Time greedy generation of `new_tokens` after a prompt of `prompt_tokens` tokens, plainly
    and with `config`'s speculative decoding, round-robin, the best of `repeats` kept.

    The model is `model_dir`'s (or a randomly initialised `preset`). The prompt is text from
    the builtin corpus when the model has a tokenizer (prompt lookup finds repeats in real
    text), else random token ids. Returns both decode speeds, whether the outputs agree, the
    acceptance rate and tokens per forward pass, and the distinct experts per MoE layer of
    one token and of one verify pass (from an extra, untimed run that records the routing).
    """
    generator, has_text = _generator(model_dir, preset, seed)
    cfg = generator.model.cfg
    if prompt_tokens + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    prompt, source = _prompt(generator, has_text, prompt_tokens, seed)
    fast = Generator(generator.model, generator.tokenizer)
    spec = fast.speculative = Speculator(fast, config)

    def greedy(gen: Generator, n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        return gen.generate([prompt], params)[0].token_ids

    plain_ids = greedy(generator, new_tokens)  # untimed: first-call allocations
    same = greedy(fast, new_tokens) == plain_ids
    sides = {"plain": generator, "speculative": fast}
    fns = {
        f"{side}_{n}": functools.partial(greedy, gen, n)
        for side, gen in sides.items()
        for n in (1, new_tokens)
    }
    t = {name: min(ts) for name, ts in round_robin(fns, repeats).items()}
    speed = {
        side: (new_tokens - 1) / max(t[f"{side}_{new_tokens}"] - t[f"{side}_1"], 1e-9)
        for side in sides
    }
    stats = spec.stats = SpeculativeStats(experts=True)  # one more run, recording routing
    greedy(fast, new_tokens)
    k = config.num_draft_tokens
    passes = _pass_times(generator.model, prompt, plain_ids[: k + 1], repeats)
    moe = cfg.moe
    per_layer = max(stats.layer_passes, 1)
    return SpeculativeBench(
        model=str(model_dir) if model_dir else f"{preset} (random weights)",
        prompt=source,
        method=config.method,
        draft=config.draft_dir,
        num_draft_tokens=config.num_draft_tokens,
        prompt_tokens=len(prompt),
        new_tokens=new_tokens,
        plain_tokens_per_s=speed["plain"],
        speculative_tokens_per_s=speed["speculative"],
        same_tokens=same,
        acceptance_rate=stats.acceptance_rate,
        tokens_per_pass=stats.tokens_per_step,
        num_experts=moe.num_experts if moe is not None else None,
        experts_single=stats.single_experts / per_layer,
        experts_verify=stats.verify_experts / per_layer,
        decode_pass_s=passes[0],
        verify_pass_s=passes[1],
    )


@torch.inference_mode()
def _pass_times(
    model: Any, prompt: list[int], tokens: list[int], repeats: int
) -> tuple[float, float]:
    """Seconds of one forward pass after `prompt` through the KV cache, of `tokens[:1]` and of
    all of `tokens`, timed round-robin (the best of 10 x `repeats` samples of each)."""
    from moekit.nn.kv_cache import KVCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, 1, len(prompt) + len(tokens), device=device, dtype=dtype)
    run = functools.partial(model, cache=cache, causal_routing=True, routing_stats=False)
    run(torch.tensor([prompt], device=device), last_logits=True)

    def one(n: int) -> None:
        run(torch.tensor([tokens[:n]], device=device))
        cache.truncate_row(0, len(prompt))

    t = round_robin(
        {"one": functools.partial(one, 1), "all": functools.partial(one, len(tokens))}, 10 * repeats
    )
    return min(t["one"]), min(t["all"])


def _generator(model_dir: str | Path | None, preset: str, seed: int) -> tuple[Generator, bool]:
    """The generator, and whether it has a real tokenizer (else token ids only)."""
    if model_dir is not None:
        from moekit.model_dir import ModelDir, load_model

        if any(ModelDir(model_dir).tokenizer_files()):
            return Generator.from_dir(model_dir, device="cpu"), True
        return Generator(load_model(model_dir, device="cpu"), ids_tokenizer()), False
    from moekit.model import build_model
    from moekit.presets import get_preset

    return Generator(build_model(get_preset(preset), seed=seed), ids_tokenizer()), False


def _prompt(generator: Generator, has_text: bool, n: int, seed: int) -> tuple[list[int], str]:
    """`n` prompt tokens: the start of a builtin-corpus document of each domain in turn until
    there are enough (a real tokenizer), else random ids."""
    if has_text:
        from moekit.data.corpus import builtin_corpus

        ids: list[int] = []
        for doc in builtin_corpus(max_chars_per_domain=20_000, seed=seed):
            ids += generator.tokenizer.encode(doc.text[:4000])
            if len(ids) >= n:
                return ids[:n], "builtin corpus text"
    g = torch.Generator().manual_seed(seed)
    low = 2  # skip the special tokens
    ids = torch.randint(low, generator.model.cfg.vocab_size, (n,), generator=g).tolist()
    return ids, "random token ids"
