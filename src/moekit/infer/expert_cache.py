"""Routed experts paged from the model's safetensors files into a per-layer cache.

Shape legend: S kept token copies, D model dim, F expert hidden dim, E experts of the layer,
C cache slots of the layer (C <= E).

A `PagedExperts` is an `Experts` module whose stacked weights hold C slots instead of E
experts (`PagedQuantExperts` the same for quantised experts: a slot holds an expert's packed
weights, scales and minimums). Before a backend runs, `compute` makes sure the experts the
rows were routed to sit in slots (reading each missing expert's slice of every stacked tensor
it is stored as, e.g. `w_gate_EFD`, `w_up_EFD` and `w_down_EDF`, from the file, evicting the
least recently or least frequently used one), renumbers the rows from experts to slots and
runs the same computation on the slots: every expert sees the same rows in the same order with
the same weights, so outputs equal the fully resident model's. When a call needs more experts
than there are slots (a long prompt), they are computed in rounds.

With prefetch, a layer applies the next MoE layer's router to its own input and loads the
experts it names for that layer on a background thread while it computes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moekit.moe.experts import ExpertBackend, Experts, compute_dtype, decode_experts
from moekit.nn.mlp import Activation
from moekit.quant.experts import QuantExperts
from moekit.quant.weight import QuantWeight
from moekit.weights import StoredTensor, UnreadableWeightsError, open_weights, read_tensor

POLICIES = ("lru", "lfu")
PROJECTIONS = ("w_gate", "w_up", "w_down")


@dataclass
class LayerMetrics:
    """What one layer's expert cache did: `hits` and `misses` count the experts calls needed
    (found in a slot, or read on demand), `bytes_read` every byte read from the files
    (prefetch included), `stall_s` the time the layer waited for reads (on demand, or for a
    prefetch still running). `guessed` and `guessed_right`: experts prefetch named for the
    layer, and of the experts it then needed, how many had been named (`needed_after_guess`)."""

    layer: int
    experts: int
    slots: int
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    guessed: int = 0
    guessed_right: int = 0
    needed_after_guess: int = 0

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None

    @property
    def prefetch_accuracy(self) -> float | None:
        if not self.needed_after_guess:
            return None
        return self.guessed_right / self.needed_after_guess

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "experts": self.experts,
            "slots": self.slots,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "bytes_read": self.bytes_read,
            "stall_s": round(self.stall_s, 6),
            "prefetch_accuracy": self.prefetch_accuracy,
        }


class ExpertFiles:
    """Reads one expert of one layer from the model's safetensors files. Each file's size,
    inode and modification time are recorded when the model is loaded: a file that has since
    gone missing, been truncated or replaced is an UnreadableWeightsError naming the file and
    the tensor, never garbage."""

    def __init__(self, stored: dict[str, StoredTensor]) -> None:
        self.stored = stored
        paths = {t.path for t in stored.values() if t.path is not None}
        self.seen = {p: os.stat(p) for p in paths}

    def read(self, name: str, e: int, out: Tensor) -> int:
        """Read expert `e`'s slice of stacked tensor `name` into `out`; returns the bytes read."""
        stored = self.stored[name]
        assert stored.path is not None
        fd = open_weights(stored.path, name)
        try:
            now, was = os.fstat(fd), self.seen[stored.path]
            if (now.st_size, now.st_ino, now.st_mtime_ns) != (
                was.st_size,
                was.st_ino,
                was.st_mtime_ns,
            ):
                reason = (
                    f"reading tensor {name!r}: the file changed after the model was loaded "
                    f"({was.st_size} bytes then, {now.st_size} now)"
                )
                raise UnreadableWeightsError(stored.path, reason)
            read_tensor(name, stored, out, fd, index=e)
        finally:
            os.close(fd)
        return stored.nbytes // stored.shape[0]


@dataclass
class Pager:
    """What the paged layers of one model share: the files, the policy, the prefetch thread,
    and each MoE layer's successor (whose experts a layer guesses)."""

    files: ExpertFiles
    policy: str = "lru"
    prefetch: bool = True
    layers: dict[int, SlotCache] = field(default_factory=dict)
    routers: dict[int, nn.Module] = field(default_factory=dict)
    following: dict[int, int] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Any, *args: Any) -> Future[None]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch")
        return self._pool.submit(fn, *args)

    def metrics(self) -> list[LayerMetrics]:
        return [self.layers[i].metrics for i in sorted(self.layers)]

    def reset_metrics(self) -> None:
        for layer in self.layers.values():
            layer.wait()
            m = layer.metrics
            layer.metrics = LayerMetrics(layer=m.layer, experts=m.experts, slots=m.slots)


class SlotCache:
    """The cache of one paged MoE layer, mixed into an expert store (float `Experts` or
    quantised `QuantExperts`) whose stacked tensors hold `num_experts` = C slots: the store
    names the tensors an expert is stored as (`slot_tensors`), the cache reads experts into
    slots and runs the store's own compute on the slots."""

    num_experts: int
    dim: int

    def _init_cache(self, layer: int, total: int, pager: Pager) -> None:
        slots = self.num_experts
        self.layer, self.total, self.pager = layer, total, pager
        self.prefix = f"layers.{layer}.ffn.experts."
        self.slot_of = [-1] * total  # expert -> slot, -1 when not in memory
        self.expert_in = [-1] * slots  # slot -> expert, -1 when empty
        self.last_used = [0] * slots
        self.uses = [0] * total
        self.clock = 0
        self.metrics = LayerMetrics(layer=layer, experts=total, slots=slots)
        self.pending: Future[None] | None = None
        self.guess: set[int] | None = None

    def slot_tensors(self) -> list[tuple[str, Tensor]]:
        """(stored name after the layer's `experts.` prefix, the (C, ...) tensor of slots) for
        every tensor one expert is stored as."""
        raise NotImplementedError

    def _loaded(self, s: int) -> None:
        """Called after slot `s` was written (a store that derives data from it drops it)."""

    # ---- the cache ---------------------------------------------------------------------
    def _victim(self, pinned: set[int]) -> int:
        empty = [s for s in range(self.num_experts) if self.expert_in[s] < 0]
        if empty:
            return empty[0]
        free = [s for s in range(self.num_experts) if s not in pinned]
        assert free, "more experts pinned than slots"
        if self.pager.policy == "lfu":
            return min(free, key=lambda s: (self.uses[self.expert_in[s]], self.last_used[s]))
        return min(free, key=lambda s: self.last_used[s])

    def _load(self, e: int, pinned: set[int]) -> int:
        """Read expert `e` into a slot (not one of `pinned`); returns the slot."""
        s = self._victim(pinned)
        old = self.expert_in[s]
        if old >= 0:
            self.slot_of[old] = -1
        self.expert_in[s] = -1  # empty until every tensor is read
        for name, slots in self.slot_tensors():
            with torch.no_grad():
                n = self.pager.files.read(self.prefix + name, e, slots.data[s])
            self.metrics.bytes_read += n
        self._loaded(s)
        self.expert_in[s], self.slot_of[e] = e, s
        return s

    def _bring(self, experts: list[int]) -> list[int]:
        """The slots of `experts` (at most one per slot), reading those not in memory."""
        pinned = {self.slot_of[e] for e in experts if self.slot_of[e] >= 0}
        slots = []
        for e in experts:
            s = self.slot_of[e]
            if s < 0:
                s = self._load(e, pinned)
                pinned.add(s)
            self.clock += 1
            self.last_used[s] = self.clock
            self.uses[e] += 1
            slots.append(s)
        return slots

    def wait(self) -> None:
        """Wait for this layer's prefetch, if one is running (the time counts as a stall);
        a read it failed is raised here."""
        if self.pending is None:
            return
        start = time.perf_counter()
        pending, self.pending = self.pending, None
        try:
            pending.result()
        finally:
            self.metrics.stall_s += time.perf_counter() - start

    def _prefetch(self, experts: list[int]) -> None:
        pinned: set[int] = set()
        for e in experts[: self.num_experts]:
            s = self.slot_of[e]
            pinned.add(s if s >= 0 else self._load(e, pinned))

    def _guess_next(self, x_SD: Tensor) -> None:
        following = self.pager.following.get(self.layer)
        if not self.pager.prefetch or following is None:
            return
        nxt = self.pager.layers[following]
        nxt.wait()
        with torch.no_grad():
            experts_SK = self.pager.routers[following](x_SD, causal=True).experts
        counts = torch.bincount(experts_SK[experts_SK >= 0].flatten(), minlength=nxt.total)
        order = [e for e in counts.argsort(descending=True, stable=True).tolist() if counts[e]]
        nxt.guess = set(order[: nxt.num_experts])
        nxt.metrics.guessed += len(nxt.guess)
        nxt.pending = self.pager.submit(nxt._prefetch, order)

    # ---- the forward pass --------------------------------------------------------------
    def _begin(self, needed: list[int], x: Tensor) -> list[list[int]]:
        """Account for a call that needs `needed` experts and start the next layer's prefetch;
        the experts in rounds of at most one per slot, those already in memory first."""
        self.wait()
        if self.guess is not None:
            self.metrics.needed_after_guess += len(needed)
            self.metrics.guessed_right += len(self.guess.intersection(needed))
            self.guess = None
        self._guess_next(x)
        resident = [e for e in needed if self.slot_of[e] >= 0]
        missing = [e for e in needed if self.slot_of[e] < 0]
        self.metrics.hits += len(resident)
        self.metrics.misses += len(missing)
        order, size = resident + missing, self.num_experts
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _lookup(self, experts: list[int], device: torch.device) -> Tensor:
        """(total,) the slot of each of `experts` (read into memory now), -1 for the others."""
        start = time.perf_counter()
        slots = self._bring(experts)
        self.metrics.stall_s += time.perf_counter() - start
        lut_E = torch.full((self.total + 1,), -1, dtype=torch.long, device=device)
        lut_E[torch.tensor(experts, device=device)] = torch.tensor(slots, device=device)
        return lut_E  # index `total` (-1 wraps to it) stays -1: an empty slot stays empty

    def compute(
        self, backend: ExpertBackend, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor,
        scale_S: Tensor,
    ) -> Tensor:  # fmt: skip
        rounds = self._begin(counts_E.nonzero().flatten().tolist(), x_SD)
        y_SD = x_SD.new_zeros(x_SD.shape[0], self.dim, dtype=compute_dtype(x_SD))
        for experts in rounds:
            slot_S = self._lookup(experts, x_SD.device)[expert_S]
            if len(rounds) > 1:
                rows = (slot_S >= 0).nonzero().squeeze(1)
                y_SD[rows] = self._run(backend, x_SD[rows], slot_S[rows], scale_S[rows])
            else:
                y_SD = self._run(backend, x_SD, slot_S, scale_S).to(y_SD.dtype)
        return y_SD

    def decode(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """The decode path on the slots: the same arithmetic as the loaded model's when the
        step's experts fit in the cache at once (otherwise summed over rounds)."""
        needed = sorted({e for e in experts_TK.flatten().tolist() if e >= 0})
        rounds = self._begin(needed, x_TD)
        y_TD: Tensor | None = None
        for experts in rounds:
            slot_TK = self._lookup(experts, x_TD.device)[experts_TK]
            part = decode_experts(x_TD, slot_TK, weights_TK, self)  # type: ignore[arg-type]
            y_TD = part if y_TD is None else y_TD + part
        assert y_TD is not None
        return y_TD

    def _run(self, backend: ExpertBackend, x_SD: Tensor, slot_S: Tensor, scale_S: Tensor) -> Tensor:
        """`backend` on the slots, rows grouped by slot where it needs them sorted (a stable
        sort: each expert keeps its rows in their order)."""
        counts_C = torch.bincount(slot_S, minlength=self.num_experts)
        store: Any = self
        if not backend.needs_sorted:
            return backend.fn(x_SD, slot_S, counts_C, scale_S, store)
        order_S = torch.argsort(slot_S, stable=True)
        y_SD = backend.fn(x_SD[order_S], slot_S[order_S], counts_C, scale_S[order_S], store)
        return torch.empty_like(y_SD).index_copy_(0, order_S, y_SD)


class PagedExperts(SlotCache, Experts):
    """The float experts of MoE layer `layer`: `total` experts stored in `pager`'s files,
    `slots` of them in memory at a time (the stacked weights hold the slots)."""

    def __init__(
        self, layer: int, total: int, slots: int, dim: int, hidden: int,
        activation: str | Activation, pager: Pager, *, bias: bool = False,
    ) -> None:  # fmt: skip
        Experts.__init__(self, slots, dim, hidden, activation, bias=bias)
        self._init_cache(layer, total, pager)

    def slot_tensors(self) -> list[tuple[str, Tensor]]:
        # An expert's biases (gpt-oss) are paged with its weights.
        names = (*PROJECTIONS, "b_gate", "b_up", "b_down")
        return [(n, w) for n in names if (w := getattr(self, n)) is not None]


class PagedQuantExperts(SlotCache, QuantExperts):
    """`PagedExperts` for quantised experts: a slot holds one expert's packed weights, scales
    (and minimums), read from their stacked tensors."""

    def __init__(
        self, layer: int, total: int, slots: int, like: QuantExperts, pager: Pager
    ) -> None:
        QuantExperts.__init__(
            self, slots, like.dim, like.hidden, like.act_fn, like.bits, like.group,
            bias=like.b_up is not None,
        )  # fmt: skip
        self._init_cache(layer, total, pager)

    def _weights(self) -> list[tuple[str, QuantWeight]]:
        return [(n, w) for n in PROJECTIONS if (w := getattr(self, n)) is not None]

    def slot_tensors(self) -> list[tuple[str, Tensor]]:
        packed = [(f"{n}.{p}", t) for n, w in self._weights() for p, t in w.parts().items()]
        biases = [
            (n, b) for n in ("b_gate", "b_up", "b_down") if (b := getattr(self, n)) is not None
        ]
        return packed + biases  # an expert's float biases (gpt-oss) are paged with it

    def _loaded(self, s: int) -> None:
        for _, w in self._weights():
            w.forget(s)
