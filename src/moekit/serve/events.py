"""What goes into the serving engine and what comes out: an `EngineRequest`, and the events
sent back through its `emit` callback (tokens, the prompt's logprobs, the end). Also how a
token's logprob entry is read from a row of log-probabilities.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor

from moekit.infer.constrain import Grammar
from moekit.infer.generate import Routing
from moekit.infer.sampling import SamplingParams


class TopLogprob(NamedTuple):
    """One of the most likely tokens at a position: its id, text and log-probability."""

    id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """The log-probability of the token at a position, and the `top` alternatives there."""

    id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class TokenEvent:
    """A generated token: its id, the text it releases, its logprobs, its routing.

    A stop token (end-of-text or a stop token id) is sent only when logprobs were asked for,
    with no text and no routing (it is never fed to the model); id -1 carries the text still
    held back when the request ends."""

    id: int
    text: str
    logprob: TokenLogprob | None
    routing: Routing | None = None


@dataclass
class PromptEvent:
    """Sent once after prefill: the prompt's token logprobs (echo), the first None."""

    logprobs: list[TokenLogprob | None]


@dataclass
class DoneEvent:
    """The end of a request. `completion_tokens` counts a stop token too (as vLLM does)."""

    finish_reason: str  # "stop", "length", "cancelled", "abort" (shutdown) or "error"
    text: str
    completion_tokens: int
    error: str | None = None
    # With `return_routed_experts`: the experts each MoE layer chose for each token the model
    # read, in the JSON form of moekit.infer.routing_replay.
    routed_experts: dict[str, Any] | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed


Event = TokenEvent | PromptEvent | DoneEvent


@dataclass
class EngineRequest:
    """What a client asked for. `logprobs`: None for none, else how many alternatives per
    token (0: only the chosen token's); `echo_logprobs`: send the prompt's logprobs too
    (a PromptEvent); `prompt_only`: generate nothing, only run (and score) the prompt, ending
    with finish reason "length". `emit` receives the events, in the engine thread.
    `grammar`: a compiled output constraint (moekit.infer.constrain) every sampled token
    follows; the request ends with "stop" once its output is complete."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    logprobs: int | None = None
    echo_logprobs: bool = False
    prompt_only: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    grammar: Grammar | None = None
    # Routing replay (moekit.infer.routing_replay): (R, M, K) int64 experts to force, row j on
    # token j of the prompt followed by the generated tokens (-1: an empty slot; past row R
    # the model routes itself); and whether to record the routing (into `routed_log`, one
    # (n, M, K) piece per forward pass, for the DoneEvent).
    routed_experts: Tensor | None = None
    return_routed_experts: bool = False
    routed_log: list[Tensor] = field(default_factory=list, repr=False)
    cached_tokens: int = 0  # set by the engine: prompt tokens found in the prefix cache

    @property
    def new_tokens(self) -> int:
        """The most tokens it adds to its prompt: none when it only scores the prompt."""
        return 0 if self.prompt_only else self.params.max_new_tokens


def token_logprob(tokenizer: Any, logp_V: Tensor, token: int, top: int) -> TokenLogprob:
    """The entry of `token` in a row of log-probabilities, with the `top` most likely tokens
    as its alternatives."""
    alternatives: list[TopLogprob] = []
    if top:
        values, ids = logp_V.topk(top)
        alternatives = [
            TopLogprob(int(t), tokenizer.decode([int(t)]), float(v))
            for v, t in zip(values.tolist(), ids.tolist(), strict=True)
            if v != float("-inf")  # forbidden by an output constraint: not an alternative
        ]
    return TokenLogprob(token, tokenizer.decode([token]), float(logp_V[token]), alternatives)


def prompt_logprobs(
    tokenizer: Any, logits_LV: Tensor, targets: list[int], top: int
) -> list[TokenLogprob]:
    """The entry of `targets[i]` in the log-softmax of `logits_LV[i]`, for each i: row i of a
    prompt's logits scores the token after it."""
    out = []
    for start in range(0, len(targets), 256):  # a few rows at a time: (L, V) can be big
        logp = logits_LV[start : start + 256].float().log_softmax(-1)
        for i, token in enumerate(targets[start : start + 256]):
            out.append(token_logprob(tokenizer, logp[i], token, top))
    return out
