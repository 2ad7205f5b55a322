"""Sampling parameters and the next-token choice.

Order of operations on a row of logits: repetition penalty, then temperature (0 = greedy:
argmax, no randomness), then the top-k, top-p (nucleus) and min-p filters, then a draw from
the remaining distribution with the request's own random generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.validate import check_field_types, fail

MAX_SEED = 2**63 - 1  # a signed 64-bit integer (torch.manual_seed overflows past 2**64 - 1)
MAX_STOPS = 64  # a sanity bound: each stop string is searched for after every token


@dataclass(kw_only=True)
class SamplingParams:
    """How to continue a prompt.

    max_new_tokens: at most this many new tokens.
    temperature: 0 is greedy decoding; otherwise logits are divided by it (0 < t <= 5).
    top_k: keep the k most likely tokens (0: off). top_p: keep the smallest set whose
    probability reaches p (1: off). min_p: drop tokens less likely than min_p times the most
    likely one (0: off). repetition_penalty: > 1 makes tokens already in the prompt or the
    output less likely (the CTRL rule: positive logits divided, negative multiplied).
    seed: makes sampling reproducible (0 <= seed < 2**63: a signed 64-bit integer, which
    every torch generator and JSON client handles). stop: strings that end the output (not
    included).
    stop_token_ids: token ids that end the output; the tokenizer's end-of-text is added
    unless `ignore_eos`. experts_per_token: route each token to this many experts instead of
    the model's top-k (within what the model allows). return_routing: record each generated
    token's experts and weights per MoE layer.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    experts_per_token: int | None = None
    return_routing: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        owner = "SamplingParams"
        if self.max_new_tokens < 1:
            raise fail(owner, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise fail(owner, "temperature", self.temperature, "must be in [0, 5]")
        if self.top_k < 0:
            raise fail(owner, "top_k", self.top_k, "must be >= 0 (0: off)")
        if not 0.0 < self.top_p <= 1.0:
            raise fail(owner, "top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise fail(owner, "min_p", self.min_p, "must be in [0, 1)")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise fail(owner, "repetition_penalty", self.repetition_penalty, "must be in (0, 10]")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise fail(owner, "seed", self.seed, f"must be in [0, {MAX_SEED}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise fail(owner, "stop", self.stop, "must be non-empty strings")
        if len(self.stop) > MAX_STOPS:
            raise fail(owner, "stop", f"{len(self.stop)} strings", f"at most {MAX_STOPS}")


def apply_repetition_penalty(logits_V: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Penalise the token ids in `seen` (1-D) in a copy of `logits_V`."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits_V
    logits_V = logits_V.clone()
    ids = seen.unique()
    picked = logits_V[ids]
    logits_V[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits_V


def filter_logits(logits_V: Tensor, top_k: int, top_p: float, min_p: float) -> Tensor:
    """Set the logits of excluded tokens to -inf (the most likely token always survives)."""
    if top_k and top_k < logits_V.shape[-1]:
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if min_p > 0.0:
        probs = logits_V.softmax(-1)
        logits_V = logits_V.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_V.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits_V = logits_V.masked_fill(drop, float("-inf"))
    return logits_V


def next_token(
    logits_V: Tensor, params: SamplingParams, generator: torch.Generator | None, seen: Tensor
) -> int:
    """Choose the next token id from one row of logits."""
    logits_V = apply_repetition_penalty(logits_V.float(), seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(logits_V.argmax())
    logits_V = filter_logits(
        logits_V / params.temperature, params.top_k, params.top_p, params.min_p
    )
    probs = logits_V.softmax(-1)
    # A draw from `probs`: argmax of p / E with E ~ Exp(1) (the exponential race); a few
    # times cheaper than torch.multinomial for one sample on the CPU.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / race).argmax())


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
