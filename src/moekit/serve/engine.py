"""The serving engine: continuous batching of generation requests in one background thread.

Requests wait in a bounded queue. The engine thread keeps up to `max_batch` of them in the
slots of one batched KV cache: a new request takes a free slot and its prompt is prefilled
alone (prefill.py), `prefill_chunk` tokens per turn of the loop, between the decode steps of
the running requests; once through, its cache row is copied into the slot. Every step decodes
one token for all occupied slots in a single forward pass (idle slots take part masked out and
do not grow). Each request samples with its own parameters and random generator, and may
route its tokens to its own number of experts. Events go back through the request's `emit`
callback, called from the engine thread.

Every request gets exactly one `DoneEvent`, whatever happens: a request that fails (a bad
seed, a failed prefill) fails alone, and stopping the engine ends the waiting and running
requests with finish reason "abort". Draining (`drain`) refuses new requests but lets the
waiting and running ones finish, within a grace period.

A request with an output constraint (`EngineRequest.grammar`, see moekit.infer.constrain) has
its slot's logits masked before each token is sampled, and ends with "stop" once its output is
complete.

The KV cache holds `max_context` positions per slot (by default the model's context, capped
at 4096): an imported model with a 32k context would otherwise claim tens of GB up front.

A prefix cache (prefix_cache.py) keeps the keys and values of recent prompts' blocks, so that a
prompt that starts as an earlier one did is prefilled from where the stored blocks end.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.infer.constrain import Matcher
from moekit.infer.detokenize import TextTracker
from moekit.infer.generate import ContextLengthError, Generator, check_fits, routing_of
from moekit.infer.sampling import SamplingParams, make_generator, next_token
from moekit.nn.kv_cache import KVCache
from moekit.serve import replay, speculate
from moekit.serve.compiled_step import CompiledSteps
from moekit.serve.events import (
    DoneEvent,
    EngineRequest,
    Event,
    PromptEvent,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    token_logprob,
)
from moekit.serve.prefill import Prefill
from moekit.serve.prefix_cache import (
    DEFAULT_BLOCK_TOKENS,
    PrefixCache,
    check_prefix_tokens,
    default_tokens,
)

__all__ = [
    "DoneEvent",
    "Engine",
    "EngineRequest",
    "EngineStoppedError",
    "Event",
    "PromptEvent",
    "QueueFullError",
    "RequestTooLargeError",
    "TokenEvent",
    "TokenLogprob",
    "TopLogprob",
]

log = logging.getLogger("moekit.serve")  # failures, with their tracebacks

DEFAULT_MAX_CONTEXT = 4096
# Prompt tokens prefilled per turn of the engine loop, between two decode steps: a running
# stream waits for one chunk at most, and chunks this long keep the prefill's own cost close
# to a single pass.
DEFAULT_PREFILL_CHUNK = 512
SHUTTING_DOWN = "the server is shutting down"


class QueueFullError(Exception):
    """The request queue is full; the client should retry later."""


class RequestTooLargeError(ValueError):
    """A request asks for more generations at once than the queue can ever hold."""


class EngineStoppedError(Exception):
    """The engine has stopped and takes no more requests."""


@dataclass
class _Slot:
    req: EngineRequest
    gen: torch.Generator
    seen: Tensor
    tracker: TextTracker
    logits: Tensor  # for the next token
    produced: int = 0
    pending: TokenEvent | None = None  # waiting for its routing
    finish: str | None = None
    matcher: Matcher | None = None  # the request's output constraint, if any
    feed: int | None = None  # chosen while checking drafts (speculate.py): fed at the next step

    def __post_init__(self) -> None:
        if self.req.grammar is not None:
            self.matcher = self.req.grammar.matcher()


@dataclass
class EngineStats:
    """Counters for /metrics (read from other threads; updated by the engine thread only)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: collections.Counter[str] = field(default_factory=collections.Counter)
    decode_steps: int = 0
    batched_tokens: int = 0  # sum over decode steps of the rows decoded together
    drafted_tokens: int = 0  # speculative decoding (speculate.py): tokens drafted
    accepted_tokens: int = 0  # and kept
    expert_tokens: dict[int, Tensor] = field(default_factory=dict)  # (E,) int64 per MoE layer


class Engine:
    """Continuous batching over one model. `max_batch`: requests decoded together;
    `max_queue`: requests waiting for a slot before `submit` refuses more; `max_context`:
    prompt plus new tokens per request, the length of each slot's KV cache (default: the
    model's max_seq_len, at most 4096); `prefill_chunk`: prompt tokens prefilled between two
    decode steps (0: a whole prompt at once, stalling the running requests meanwhile);
    `prefix_cache_tokens`: prompt tokens the prefix cache keeps (None: a quarter of
    max_batch x max_context; 0: no prefix cache); `speculative_tokens`: prompt-lookup drafts
    per slot and step, checked in the decode pass (0: none; see speculate.py)."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache_tokens: int | None = None,
        speculative_tokens: int = 0,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int):
            raise TypeError(f"prefill_chunk must be an int, got {type(prefill_chunk).__name__}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={prefill_chunk} is invalid: must be >= 0 (0: off)")
        self.prefill_chunk = prefill_chunk
        self.generator = generator
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self.cfg = self.model.cfg
        model_max = self.cfg.max_seq_len
        if max_context is None:
            max_context = min(model_max, DEFAULT_MAX_CONTEXT)
        if isinstance(max_context, bool) or not isinstance(max_context, int):
            raise TypeError(f"max_context must be an int, got {type(max_context).__name__}")
        if not 1 <= max_context <= model_max:
            raise ValueError(
                f"max_context={max_context} is invalid: must be in [1, {model_max}] "
                "(the model's max_seq_len)"
            )
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self._limit = "this model's maximum context length"
        if max_context < model_max:
            self._limit = (
                "this server's maximum context length (its max_context setting; the model's "
                f"own is {model_max})"
            )
        self.device = generator.device
        self.stats = EngineStats()
        moe = self.cfg.moe
        self.default_top_k = 0
        if moe is not None:
            layer = next(iter(self.model.moe_layers().values()))
            self.default_top_k = getattr(layer.router, "causal_k", moe.top_k)
            self.max_top_k = layer.router.max_top_k
        else:
            self.max_top_k = 0
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slots: list[_Slot | None] = [None] * max_batch
        self._prefills: list[Prefill] = []  # admitted, in order; each holds a slot
        self._stop = False
        self._draining, self._deadline = False, math.inf
        self._thread: threading.Thread | None = None
        self._cache = KVCache(
            self.cfg, max_batch, max_context, device=self.device, dtype=generator.dtype
        )
        self.prefix_cache = self._prefix_cache(prefix_cache_tokens)
        speculate.check_speculative_tokens(speculative_tokens)
        self.speculative_tokens = speculative_tokens
        self.drafter: Any = None  # a draft model's drafts instead of prompt lookup's (draft.py)
        self.compiled: CompiledSteps | None = None  # with generator.compile (compiled_step.py)
        if generator.compile:
            self.compiled = CompiledSteps(self.model, self._cache, self.tokenizer.pad_id)

    def _prefix_cache(self, tokens: int | None) -> PrefixCache | None:
        """The prefix cache of `tokens` tokens (None: the default size; 0: none)."""
        check_prefix_tokens(tokens)
        if tokens is None:  # too small a server for one block: none
            tokens = default_tokens(self.max_batch, self.max_context)
            tokens = tokens if tokens >= DEFAULT_BLOCK_TOKENS else 0
        if tokens == 0:
            return None
        return PrefixCache(self.cfg, tokens, device=self.device, dtype=self.generator.dtype)

    # ---- outside the engine thread ----------------------------------------------------
    def run(self) -> None:
        """Run the engine loop in the calling thread until `stop()`.

        On CPUs, run it in the main thread when speed matters: PyTorch's OpenMP kernels ran
        2-3x slower here when called from a second thread (`moekit serve` puts the HTTP
        server in a thread and the engine in the main one)."""
        self._loop()

    def start(self) -> None:
        """Run the engine loop in a background thread (convenient for tests and embedding)."""
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop; waiting and running requests finish with reason "abort"."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def drain(self, grace_s: float) -> None:
        """Take no more requests (`submit` raises EngineStoppedError), let the waiting and
        running ones finish, and end the loop once none is left; whatever is left after
        `grace_s` seconds ends with reason "abort". Returns at once (call it from any thread
        but a signal handler: it takes the engine's lock)."""
        with self._wake:
            self._draining = True
            self._deadline = min(self._deadline, time.monotonic() + max(0.0, grace_s))
            self._wake.notify()

    @property
    def accepting(self) -> bool:
        """Whether `submit` takes requests (not stopped, not draining)."""
        return not (self._stop or self._draining)

    def submit(self, *requests: EngineRequest) -> None:
        """Queue requests together (all or none). Raises ContextLengthError when one does not
        fit `max_context`, RequestTooLargeError when there are more than the queue can ever
        hold, QueueFullError when there is no room now, EngineStoppedError after `stop()`."""
        if len(requests) > self.max_queue:
            raise RequestTooLargeError(
                f"{len(requests)} generations were asked for at once, but the queue holds at "
                f"most {self.max_queue} (the server's max_queue setting)"
            )
        for req in requests:
            self.check_fits(len(req.prompt_ids), req.new_tokens)
        with self._wake:
            if not self.accepting:
                raise EngineStoppedError(SHUTTING_DOWN)
            if len(self._queue) + len(requests) > self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting")
            self._queue.extend(requests)
            self._wake.notify()

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ContextLengthError unless a request of this size fits `max_context`."""
        check_fits(prompt_tokens, max_new_tokens, self.max_context, limit=self._limit)

    def check_prompt_size(self, chars: int, min_tokens: int) -> None:
        """ContextLengthError when a prompt of `chars` characters, which the tokenizer turns
        into at least `min_tokens` tokens, cannot fit `max_context` even alone."""
        if min_tokens > self.max_context:
            raise ContextLengthError(
                f"{self._limit} is {self.max_context} tokens, but the prompt has {chars} "
                f"characters, which this model's tokenizer turns into at least {min_tokens} "
                "tokens; shorten the prompt"
            )

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests holding a slot: being prefilled or decoded."""
        return sum(s is not None for s in self._slots) + len(self._prefills)

    # ---- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._stop or self._draining or self._queue or self._busy()):
                        self._wake.wait(timeout=1.0)
                    if self._stop or self._drained():
                        break
                    held = {p.slot for p in self._prefills}
                    free = [i for i, s in enumerate(self._slots) if s is None and i not in held]
                    admitted = [(i, self._queue.popleft()) for i in free[: len(self._queue)]]
                for slot, req in admitted:
                    self._admit(slot, req)
                self._prefill()
                try:
                    self._step()
                except Exception as e:  # never let one bad step take the server down
                    log.exception(
                        "a decode step failed; ending the %d running requests", self.active
                    )
                    for i, s in enumerate(self._slots):
                        if s is not None:
                            self._close(i, "error", error=f"generation failed: {e}")
        finally:  # stop(), the end of a drain, or Ctrl-C in `run`: nobody may wait forever
            self._abort_all()

    def _busy(self) -> bool:
        return bool(self._prefills) or any(s is not None for s in self._slots)

    def _drained(self) -> bool:
        """Draining, and nothing is left to do or the grace period is over."""
        if not self._draining:
            return False
        return not (self._queue or self._busy()) or time.monotonic() >= self._deadline

    def _abort_all(self) -> None:
        with self._wake:
            self._stop = True
            waiting = list(self._queue)
            self._queue.clear()
        waiting += [p.req for p in self._prefills]
        self._prefills.clear()
        for req in waiting:
            self._finish(req, DoneEvent("abort", "", 0, error=SHUTTING_DOWN))
        for i, s in enumerate(self._slots):
            if s is not None:
                self._close(i, "abort", error=SHUTTING_DOWN)

    def _finish(self, req: EngineRequest, done: DoneEvent) -> None:
        """End a request that holds no slot."""
        self.stats.finished[done.finish_reason] += 1
        if req.return_routed_experts and self.cfg.moe is not None:
            num_experts = self.cfg.moe.num_experts
            done.routed_experts = replay.recorded(req, done.completion_tokens, num_experts)
        done.cached_tokens = req.cached_tokens
        self._emit(req, done)

    def _admit(self, slot: int, req: EngineRequest) -> None:
        """Start prefilling a request into `slot`; a request that cannot start fails alone."""
        if req.cancelled.is_set():
            self._finish(req, DoneEvent("cancelled", "", 0))
        elif req.prompt_only and not (req.echo_logprobs or req.return_routed_experts):
            self._finish(req, DoneEvent("length", "", 0))
        else:
            try:
                self._prefills.append(
                    Prefill(
                        req,
                        slot,
                        self.model,
                        self.tokenizer,
                        self.generator.dtype,
                        prefix=self.prefix_cache,
                    )
                )
            except Exception as e:
                log.exception("a request could not start")
                error = f"could not start generation: {e}"
                self._finish(req, DoneEvent("error", "", 0, error=error))

    def _prefill(self) -> None:
        """Run `prefill_chunk` prompt tokens (all of them when 0), oldest request first;
        a request whose prompt is through joins the batch."""
        budget = self.prefill_chunk
        while self._prefills:
            p = self._prefills[0]
            if p.req.cancelled.is_set():
                self._prefills.pop(0)
                self._finish(p.req, DoneEvent("cancelled", "", 0))
                continue
            try:
                ran = p.advance(budget)
            except Exception as e:  # this prompt failed: end it, not the others
                log.exception("a prompt's prefill failed")
                self._prefills.pop(0)
                error = f"could not start generation: {e}"
                self._finish(p.req, DoneEvent("error", "", 0, error=error))
                continue
            if p.finished:
                self._prefills.pop(0)
                self._start(p)
            if self.prefill_chunk:
                budget -= ran
                if budget <= 0:
                    return

    def _start(self, p: Prefill) -> None:
        """Put a prefilled request into its slot (or end it, when it only scores its prompt)."""
        req, ids = p.req, p.req.prompt_ids
        assert p.logits is not None
        if not req.prompt_only:
            try:
                gen = make_generator(req.params.seed, self.device)
                tracker = TextTracker(self.tokenizer, req.params.stop, context=ids)
                self._cache.load_row(p.slot, p.cache)
                seen = torch.tensor(ids, dtype=torch.long, device=self.device)
                self._slots[p.slot] = _Slot(req, gen, seen, tracker, logits=p.logits)
            except Exception as e:
                log.exception("a request could not start")
                self._slots[p.slot] = None
                self._cache.clear_row(p.slot)
                error = f"could not start generation: {e}"
                self._finish(req, DoneEvent("error", "", 0, error=error))
                return
        self.stats.prompt_tokens += len(ids)
        if req.echo_logprobs:
            self._emit(req, PromptEvent(p.echo))
        if req.prompt_only:
            self._finish(req, DoneEvent("length", "", 0))

    @torch.no_grad()
    def _step(self) -> None:
        occupied = [i for i, s in enumerate(self._slots) if s is not None]
        if not occupied:
            return
        # Decode rows 0..last occupied slot only (new requests take the lowest free slot).
        B = occupied[-1] + 1
        pad = self.tokenizer.pad_id
        step = torch.full((B, 1), pad, dtype=torch.long, device=self.device)
        fed = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        for i in occupied:
            s = self._slots[i]
            assert s is not None
            if s.req.cancelled.is_set():
                self._close(i, "cancelled")
                continue
            try:
                token = s.feed if s.feed is not None else self._choose(i, s)
                s.feed = None
            except Exception as e:  # this request's sampling failed: end it, not the batch
                log.exception("sampling failed for one request")
                self._close(i, "error", error=f"sampling failed: {e}")
                continue
            if token is not None:
                step[i, 0], fed[i, 0] = token, True
        if not bool(fed.any()):
            return
        drafts = speculate.propose(self, fed)
        if drafts is not None:
            step, fed = speculate.widen(step, fed, drafts)
        per_row = [s.req.params.experts_per_token if s else None for s in self._slots[:B]]
        top_k = None
        if any(k is not None for k in per_row):
            top_k = torch.tensor([k or self.default_top_k for k in per_row], device=self.device)
        # Routing replay: a slot's fed token is token prompt + produced - 1 of its sequence.
        fed_now = fed[:, 0].tolist()
        fed_reqs = [s.req if s and fed_now[i] else None for i, s in enumerate(self._slots[:B])]
        fed_rows = [len(s.req.prompt_ids) + s.produced - 1 if s else 0 for s in self._slots[:B]]
        forced = replay.step_replay(fed_reqs, fed_rows)
        out = None
        if self.compiled is not None and drafts is None and top_k is None and not forced:
            out = self.compiled.step(step, fed)  # None: the compiled step is off
        if out is None:
            out = self.model(
                step,
                cache=self._cache.first_rows(B),
                valid=fed,
                causal_routing=True,
                top_k=top_k,
                return_routing=True,  # the routing each token's answer and the metrics show
                routing_stats=False,  # and none of training's routing statistics
                **forced,
            )
        for i, r in enumerate(fed_reqs):
            if r is not None:
                replay.record(r, out, i, 1)
        self.stats.decode_steps += 1
        self.stats.batched_tokens += int(fed.sum())
        self._count_experts(out, fed.flatten())
        logits = out.logits[:, 0].float()  # after each row's chosen token
        for i in range(B):
            s = self._slots[i]
            if s is None or not bool(fed[i, 0]):
                continue
            s.logits = logits[i]
            if s.pending is not None:
                s.pending.routing = routing_of(out, i, 0, step.shape[1])
                self._emit(s.req, s.pending)
                s.pending = None
            if s.finish is not None:
                self._close(i, s.finish)
        if drafts is not None:
            speculate.verify(self, out.logits, drafts)

    def _count_experts(self, out: Any, fed_B: Tensor) -> None:
        """Add the experts the real (not idle) rows went to, per MoE layer, to the stats."""
        num_experts = self.cfg.moe.num_experts if self.cfg.moe else 0
        for layer, stats in out.moe_stats.items():
            experts = stats.routing.experts[fed_B]
            counts = torch.bincount(experts[experts >= 0], minlength=num_experts).cpu()
            total = self.stats.expert_tokens.get(layer)
            if total is None:
                self.stats.expert_tokens[layer] = counts
            else:
                total += counts  # in place: a tensor op per layer, no Python loop per expert

    def _choose(self, i: int, s: _Slot) -> int | None:
        """Sample slot i's next token; returns the token to feed, or None when the slot ended
        without one to feed."""
        params = s.req.params
        if s.matcher is not None:  # logprobs then are of the constrained distribution
            s.matcher.mask_(s.logits)
        token = next_token(s.logits, params, s.gen, s.seen)
        if token in self._stop_ids(params):
            # Counted and, with logprobs, reported: scoring tools read the logprob of the token
            # the model chose, even when it ends the text.
            s.produced += 1
            self.stats.generated_tokens += 1
            if s.req.logprobs is not None:
                lp = self._logprob(s.logits, token, s.req.logprobs)
                self._emit(s.req, TokenEvent(id=token, text="", logprob=lp))
            self._close(i, "stop")
            return None
        if s.matcher is not None:
            s.matcher.accept(token)
        s.seen = torch.cat([s.seen, s.seen.new_tensor([token])])
        s.produced += 1
        self.stats.generated_tokens += 1
        event = TokenEvent(
            id=token,
            text=s.tracker.add(token),
            logprob=self._logprob(s.logits, token, s.req.logprobs)
            if s.req.logprobs is not None
            else None,
        )
        if s.tracker.stopped or (s.matcher is not None and s.matcher.done):
            s.finish = "stop"
        elif s.produced >= params.max_new_tokens:
            s.finish = "length"
        if params.return_routing:
            s.pending = event  # its routing comes from the pass that feeds it
            return token
        self._emit(s.req, event)
        if s.finish is not None:
            self._close(i, s.finish)
            return None
        return token

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.generator.eos_ids
        return ids

    def _close(self, i: int, reason: str, error: str | None = None) -> None:
        s = self._slots[i]
        if s is None:
            return
        self._slots[i] = None
        self._cache.clear_row(i)
        if s.pending is not None:  # its routing will not come: release it as it is
            self._emit(s.req, s.pending)
        tail = s.tracker.flush()
        if tail:
            self._emit(s.req, TokenEvent(id=-1, text=tail, logprob=None))
        self._finish(s.req, DoneEvent(reason, s.tracker.text, s.produced, error))

    def _logprob(self, logits: Tensor, token: int, top: int | None) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), -1)
        return token_logprob(self.tokenizer, logp, token, top or 0)

    @staticmethod
    def _emit(req: EngineRequest, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # a client that went away must not stop the engine
            req.cancelled.set()
