"""The serving engine: continuous batching of generation requests in one background thread.

Requests wait in a bounded queue. The engine thread keeps up to `max_batch` of them in the
slots of one batched KV cache: a new request is prefilled alone and its cache row copied into
a free slot; then every step decodes one token for all occupied slots in a single forward pass
(idle slots take part masked out and do not grow). Each request samples with its own
parameters and random generator, and may route its tokens to its own number of experts.
Events go back through the request's `emit` callback, called from the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.infer.generate import Generator, Routing, _TextTracker, check_fits, routing_of
from moekit.infer.kv_cache import KVCache
from moekit.infer.sampling import SamplingParams, make_generator, next_token


class QueueFullError(Exception):
    """The request queue is full; the client should retry later."""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """A generated token: its id, the text it releases, its logprobs, its routing."""

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
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    text: str
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | PromptEvent | DoneEvent


@dataclass
class EngineRequest:
    """What a client asked for. `logprobs`: None for none, else how many alternatives per
    token (0: only the chosen token's). `emit` receives the events, in the engine thread."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    logprobs: int | None = None
    echo_logprobs: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Slot:
    req: EngineRequest
    gen: torch.Generator
    seen: Tensor
    tracker: _TextTracker
    logits: Tensor  # for the next token
    produced: int = 0
    pending: TokenEvent | None = None  # waiting for its routing
    finish: str | None = None


@dataclass
class EngineStats:
    """Counters for /metrics (read from other threads; updated by the engine thread only)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: collections.Counter[str] = field(default_factory=collections.Counter)
    decode_steps: int = 0
    batched_tokens: int = 0  # sum over decode steps of the rows decoded together
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)


class Engine:
    def __init__(self, generator: Generator, *, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.generator = generator
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self.cfg = self.model.cfg
        self.max_batch, self.max_queue = max_batch, max_queue
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
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cache = KVCache(
            self.cfg, max_batch, self.cfg.max_seq_len, device=self.device, dtype=generator.dtype
        )

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
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, *requests: EngineRequest) -> None:
        """Queue requests together (all or none); QueueFullError when there is no room."""
        for req in requests:
            check_fits(len(req.prompt_ids), req.params.max_new_tokens, self.cfg.max_seq_len)
        with self._wake:
            if len(self._queue) + len(requests) > self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting")
            self._queue.extend(requests)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # ---- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._queue and not any(self._slots):
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    break
                free = [i for i, s in enumerate(self._slots) if s is None]
                admitted = [(i, self._queue.popleft()) for i in free[: len(self._queue)]]
            for slot, req in admitted:
                self._admit(slot, req)
            try:
                self._step()
            except Exception as e:  # never let one bad step take the server down
                for i, s in enumerate(self._slots):
                    if s is not None:
                        self._close(i, "error", error=f"generation failed: {e}")
        for i, s in enumerate(self._slots):
            if s is not None:
                self._close(i, "cancelled")

    @torch.no_grad()
    def _admit(self, slot: int, req: EngineRequest) -> None:
        if req.cancelled.is_set():
            self._emit(req, DoneEvent("cancelled", "", 0))
            return
        try:
            ids = req.prompt_ids
            small = KVCache(self.cfg, 1, len(ids), device=self.device, dtype=self.generator.dtype)
            out = self.model(
                torch.tensor([ids], device=self.device),
                cache=small,
                causal_routing=True,
                top_k=req.params.experts_per_token,
            )
            logits = out.logits[0].float()
            self._cache.load_row(slot, small)
        except Exception as e:
            self._emit(req, DoneEvent("error", "", 0, error=f"prefill failed: {e}"))
            return
        self.stats.prompt_tokens += len(ids)
        if req.echo_logprobs:
            logprobs: list[TokenLogprob | None] = [None]
            logprobs += [
                self._logprob(logits[i], ids[i + 1], req.logprobs or 0) for i in range(len(ids) - 1)
            ]
            self._emit(req, PromptEvent(logprobs))
        self._slots[slot] = _Slot(
            req=req,
            gen=make_generator(req.params.seed, self.device),
            seen=torch.tensor(ids, dtype=torch.long, device=self.device),
            tracker=_TextTracker(self.tokenizer, req.params.stop),
            logits=logits[-1],
        )

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
            token = self._choose(i, s)
            if token is not None:
                step[i, 0], fed[i, 0] = token, True
        if not bool(fed.any()):
            return
        per_row = [s.req.params.experts_per_token if s else None for s in self._slots[:B]]
        top_k = None
        if any(k is not None for k in per_row):
            top_k = torch.tensor([k or self.default_top_k for k in per_row], device=self.device)
        out = self.model(
            step,
            cache=self._cache.first_rows(B),
            valid=fed,
            causal_routing=True,
            top_k=top_k,
            return_routing=True,
        )
        self.stats.decode_steps += 1
        self.stats.batched_tokens += int(fed.sum())
        self._count_experts(out, fed[:, 0])
        logits = out.logits[:, -1].float()
        for i in range(B):
            s = self._slots[i]
            if s is None or not bool(fed[i, 0]):
                continue
            s.logits = logits[i]
            if s.pending is not None:
                s.pending.routing = routing_of(out, i, 0, 1)
                self._emit(s.req, s.pending)
                s.pending = None
            if s.finish is not None:
                self._close(i, s.finish)

    def _count_experts(self, out: Any, fed_B: Tensor) -> None:
        """Add the experts the real (not idle) rows went to, per MoE layer, to the stats."""
        num_experts = self.cfg.moe.num_experts if self.cfg.moe else 0
        for layer, stats in out.moe_stats.items():
            experts = stats.routing.experts[fed_B]
            counts = torch.bincount(experts[experts >= 0], minlength=num_experts).tolist()
            total = self.stats.expert_tokens.setdefault(layer, [0] * num_experts)
            for e, n in enumerate(counts):
                total[e] += n

    def _choose(self, i: int, s: _Slot) -> int | None:
        """Sample slot i's next token; returns the token to feed, or None when the slot ended
        without one to feed."""
        params = s.req.params
        token = next_token(s.logits, params, s.gen, s.seen)
        if token in self._stop_ids(params):
            self._close(i, "stop")
            return None
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
        if s.tracker.stopped:
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
            ids.add(self.tokenizer.eos_id)
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
        self.stats.finished[reason] += 1
        self._emit(s.req, DoneEvent(reason, s.tracker.text, s.produced, error))

    def _logprob(self, logits: Tensor, token: int, top: int | None) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), -1)
        alternatives: list[tuple[str, float]] = []
        if top:
            values, ids = logp.topk(top)
            alternatives = [
                (self.tokenizer.decode([int(t)]), float(v))
                for v, t in zip(values, ids, strict=True)
            ]
        return TokenLogprob(self.tokenizer.decode([token]), float(logp[token]), alternatives)

    @staticmethod
    def _emit(req: EngineRequest, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # a client that went away must not stop the engine
            req.cancelled.set()


_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time())}{next(_ids):06d}"


def summary(engine: Engine) -> dict[str, Any]:
    return {"queue_depth": engine.queue_depth, "active": engine.active}
