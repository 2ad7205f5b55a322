"""Routing as a model really does it: record it on text, then measure load, capacity drops,
co-activation and consistency.

This is the one routing trace of moekit: `moekit analyze`, `moekit doctor` and the training
report all sample text with `sample_tokens` and record routing with `trace_routing` (`moekit
compare-routing` too, and it fills the same `TraceRecorder` from a transformers model), and they
(and the training metrics) judge expert health with one rule, `load_stats`:

  dead         an expert that received no copy (token x chosen expert)
  nearly dead  an expert below `nearly_dead_fraction` (default `NEARLY_DEAD_FRACTION`) of an
               even share (total copies / E); dead experts are nearly dead too
  imbalance    max over mean copies per expert (1 is perfectly even, E one expert takes all)

Recording (`trace_routing`) runs the model as inference does (`causal_routing=True`: token
choice is dropless and expert choice runs its causal mode, so a token's experts depend on that
token and its past only) and keeps every token's chosen experts per MoE layer. The metrics are
pure functions of (N, K) expert-id tensors (N tokens, K slots, E experts; -1 marks an empty
slot, as expert choice leaves them), so tests can give them routings with known answers.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from moekit.config import MoEConfig
    from moekit.data.corpus import Document
    from moekit.data.tokenizer import Tokenizer
    from moekit.model import Transformer

# An expert below this fraction of the uniform share (total copies / E) is "nearly dead".
NEARLY_DEAD_FRACTION = 0.1


def copies_per_token(moe: MoEConfig) -> int:
    """K: the experts each token is sent to under inference routing (token choice: top_k;
    expert choice in its causal mode: ceil(capacity factor), at most E)."""
    if moe.router == "expert_choice":
        return min(moe.num_experts, math.ceil(moe.capacity_factor or 1.0))
    return moe.top_k


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int, model_dir: object) -> None:
    """Raise ValueError when `tokenizer` gives ids the model (`vocab_size`) has no row for:
    the tokenizer.json of `model_dir` then belongs to another model."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"{vocab_size}; the tokenizer.json belongs to another model"
        )


# ----------------------------------------------------------------------------- recording


@dataclass
class TokenSample:
    """Token ids with a domain label each, ready to run through a model.

    ids: (N,) token ids, documents one after another with an end-of-text id between them, as
        training packs them. domains: (N,) index into `domain_names` of the document a token
        comes from (a separator takes the domain of the document it ends).
    """

    ids: Tensor
    domains: Tensor
    domain_names: list[str]

    def tokens_per_domain(self) -> dict[str, int]:
        counts = torch.bincount(self.domains, minlength=len(self.domain_names)).tolist()
        return dict(zip(self.domain_names, counts, strict=True))


def sample_tokens(docs: Sequence[Document], tokenizer: Tokenizer, max_tokens: int) -> TokenSample:
    """Tokenize `docs` into at most `max_tokens` tokens shared fairly between their domains.

    Each domain gets an equal part of the budget, taken from its documents in order (the last
    one cut); a domain with fewer tokens than its part gives the rest to the others, so a small
    domain is analysed whole and the sample stays as large as the budget allows."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: must be >= 1")
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    if not by_domain:
        raise ValueError("no documents to analyse")
    names = list(by_domain)
    # Tokenize each domain only as far as the whole budget could ever use.
    streams: list[list[int]] = []
    for name in names:
        stream: list[int] = []
        for doc in by_domain[name]:
            if len(stream) >= max_tokens:
                break
            stream += tokenizer.encode(doc.text)
            if tokenizer.eos_id is not None:  # documents separated as in training
                stream.append(tokenizer.eos_id)
        streams.append(stream[:max_tokens])
    quota = _share_budget([len(s) for s in streams], max_tokens)
    keep = [d for d, q in enumerate(quota) if q > 0]
    if not keep:
        raise ValueError("the documents hold no tokens to analyse")
    return TokenSample(
        ids=torch.tensor([t for d in keep for t in streams[d][: quota[d]]], dtype=torch.long),
        domains=torch.cat([torch.full((quota[d],), n) for n, d in enumerate(keep)]).long(),
        domain_names=[names[d] for d in keep],
    )


def _share_budget(available: list[int], budget: int) -> list[int]:
    """Water-filling: equal parts of `budget`, a part beyond what a domain has going to the rest."""
    quota = [0] * len(available)
    open_ = [i for i, a in enumerate(available) if a > 0]
    left = budget
    while open_ and left > 0:
        part = max(1, left // len(open_))
        still = []
        for i in open_:
            take = min(part, available[i] - quota[i], left)
            quota[i] += take
            left -= take
            if quota[i] < available[i]:
                still.append(i)
        open_ = still
    return quota


@dataclass
class LayerTrace:
    """One MoE layer's routing over a `TokenSample`.

    experts: (N, K) chosen expert ids per token, -1 in empty slots.
    entropy: (N,) entropy in nats of each token's routing distribution (the router's
        probabilities over all E experts, `Router.probs`: softmax of the logits, or the
        sigmoid scores normalised to sum to 1).
    row_counts: (R, E) copies sent to each expert by each row (sequence) of the run.
    weights: (N, K) the routing weight of each chosen expert, and margin: (N,) the gap between
        the K-th and the (K+1)-th best selection score (`selection_margin`); both recorded
        only when the trace is asked for them (`scores=True`), else None.
    """

    experts: Tensor
    entropy: Tensor
    row_counts: Tensor
    weights: Tensor | None = None
    margin: Tensor | None = None


@dataclass
class RoutingTrace:
    """The routing of every MoE layer over a sample, with how the sample was cut into calls.

    row_lengths: (R,) tokens of each row; row_batch: (R,) index of the forward call (batch)
    that held it. These let capacity be applied as the model would per batch or per row.
    logits_dtypes: the dtypes ("float32", ...) the router logits were computed in."""

    num_experts: int
    layers: dict[int, LayerTrace]
    row_lengths: Tensor
    row_batch: Tensor
    batch_size: int
    seq_len: int
    logits_dtypes: set[str] = field(default_factory=set)

    @property
    def tokens(self) -> int:
        """Tokens the trace holds."""
        return int(self.row_lengths.sum())

    def counts(self, layer: int) -> Tensor:
        """(E,) copies each expert of `layer` received over the whole trace."""
        return expert_counts(self.layers[layer].experts, self.num_experts)

    def load(self, layer: int, nearly_dead_fraction: float = NEARLY_DEAD_FRACTION) -> LoadStats:
        """`LoadStats` of `layer` over the whole trace (the one rule of expert health)."""
        return load_stats(self.counts(layer), nearly_dead_fraction)

    def mean_entropy(self, layer: int) -> float:
        """Mean over tokens of the routing entropy (nats) of `layer`; 0 for an empty trace."""
        entropy = self.layers[layer].entropy
        return float(entropy.double().mean()) if entropy.numel() else 0.0


def cut_rows(ids: Tensor, seq_len: int, batch_size: int) -> list[Tensor]:
    """Token ids `ids` (N,) as the batches a trace runs: (rows, seq_len) tensors of at most
    `batch_size` rows, then the remainder as one shorter row."""
    n = ids.numel()
    full = n // seq_len
    batches: list[Tensor] = [
        ids[i * seq_len : min(full, i + batch_size) * seq_len].view(-1, seq_len)
        for i in range(0, full, batch_size)
    ]
    if n % seq_len:
        batches.append(ids[full * seq_len :].view(1, -1))
    return batches


def selection_scores(logits: Tensor, score_func: str, bias: Tensor | None = None) -> Tensor:
    """(N, E) the scores a token-choice router ranks experts by: the softmax of the logits, or
    their sigmoid plus the selection bias (when there is one)."""
    if score_func == "softmax":
        return logits.float().softmax(dim=-1)
    scores = logits.float().sigmoid()
    return scores if bias is None else scores + bias.float().to(scores.device)


def selection_margin(scores: Tensor, k: int) -> Tensor:
    """(N,) how far each token is from a tie at the edge of its top k: the K-th best minus
    the (K+1)-th best of `scores` (N, E); +inf when every expert is chosen (K >= E)."""
    if k >= scores.shape[-1] or scores.shape[0] == 0:
        return torch.full((scores.shape[0],), math.inf)
    top = scores.float().topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]).cpu()


class TraceRecorder:
    """Collects the routing of each forward call into a `RoutingTrace`: the one format every
    recorder (moekit's model, a transformers model) fills. Call `add` once per MoE layer and
    batch, then `end_batch`, and `build` at the end."""

    def __init__(
        self, layers: Sequence[int], num_experts: int, *, batch_size: int, seq_len: int
    ) -> None:
        self.num_experts = num_experts
        self.batch_size, self.seq_len = batch_size, seq_len
        self._parts: dict[int, dict[str, list[Tensor]]] = {i: {} for i in layers}
        self._lengths: list[int] = []
        self._batch_of_row: list[int] = []
        self._batches = 0
        self.dtypes: set[str] = set()

    def add(
        self,
        layer: int,
        rows: int,
        experts: Tensor,
        probs: Tensor,
        *,
        weights: Tensor | None = None,
        margin: Tensor | None = None,
    ) -> None:
        """One batch of `rows` rows at `layer`: chosen `experts` (T, K), the routing
        distribution `probs` (T, E), and optionally the chosen experts' `weights` (T, K) and
        each token's selection `margin` (T,)."""
        chosen = experts.cpu()
        parts = self._parts[layer]
        parts.setdefault("experts", []).append(chosen.to(torch.int32))
        parts.setdefault("entropy", []).append(token_entropy(probs).cpu())
        per_row = chosen.view(rows, -1)
        parts.setdefault("row_counts", []).append(
            torch.stack([expert_counts(r.view(-1, 1), self.num_experts) for r in per_row])
        )
        if weights is not None:
            parts.setdefault("weights", []).append(weights.detach().float().cpu())
        if margin is not None:
            parts.setdefault("margin", []).append(margin.float().cpu())

    def end_batch(self, rows: int, length: int) -> None:
        self._lengths += [length] * rows
        self._batch_of_row += [self._batches] * rows
        self._batches += 1

    def build(self) -> RoutingTrace:
        def cat(parts: dict[str, list[Tensor]], name: str) -> Any:
            return torch.cat(parts[name]) if name in parts else None

        names = ("experts", "entropy", "row_counts", "weights", "margin")
        layers = {i: LayerTrace(*(cat(p, n) for n in names)) for i, p in self._parts.items()}
        return RoutingTrace(
            num_experts=self.num_experts,
            layers=layers,
            row_lengths=torch.tensor(self._lengths, dtype=torch.long),
            row_batch=torch.tensor(self._batch_of_row, dtype=torch.long),
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            logits_dtypes=self.dtypes,
        )


@torch.no_grad()
def trace_routing(
    model: Transformer,
    ids: Tensor,
    *,
    seq_len: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    scores: bool = False,
) -> RoutingTrace:
    """Run token ids `ids` (N,) through `model` and record each MoE layer's routing.

    The ids are cut into rows of `seq_len` (the last one shorter) and run `batch_size` rows at
    a time with inference routing (`causal_routing=True`). `progress(done, total)` is called
    after each batch. With `scores`, each layer's trace also keeps the chosen experts'
    weights and every token's selection margin. Raises ValueError for a model without MoE
    layers."""
    moe_layers = model.moe_layers()
    if not moe_layers:
        raise ValueError("the model has no MoE layers: there is no routing to analyse")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    seq_len = min(seq_len, model.cfg.max_seq_len)
    num_experts = next(iter(moe_layers.values())).cfg.num_experts
    device = next(model.parameters()).device
    model.eval()
    recorder = TraceRecorder(list(moe_layers), num_experts, batch_size=batch_size, seq_len=seq_len)
    done, n = 0, ids.numel()
    for batch in cut_rows(ids, seq_len, batch_size):
        rows, length = batch.shape
        out = model(batch.to(device), causal_routing=True, return_routing=True)
        for i, layer in moe_layers.items():
            routing = out.moe_stats[i].routing
            assert routing is not None  # asked for with return_routing=True
            recorder.dtypes.add(str(routing.logits.dtype).removeprefix("torch."))
            margin = None
            if scores:
                router = layer.router
                score_func = "softmax" if router.cfg.router == "expert_choice" else None
                choice = selection_scores(
                    routing.logits, score_func or router.cfg.score_func, router.selection_bias
                )
                margin = selection_margin(choice, routing.experts.shape[1])
            probs = layer.router.probs(routing.logits)
            weights = routing.weights if scores else None
            recorder.add(i, rows, routing.experts, probs, weights=weights, margin=margin)
        recorder.end_batch(rows, length)
        done += batch.numel()
        if progress is not None:
            progress(done, n)
    return recorder.build()


def stderr_progress(label: str) -> Callable[[int, int], None]:
    """A progress callback that rewrites one line on stderr: "label: 12,288/32,768 tokens"."""

    def report(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done:,}/{total:,} tokens", end=end, file=sys.stderr, flush=True)

    return report


# ----------------------------------------------------------------------------- load


def token_entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of each row of a (N, E) probability tensor: (N,). ln(E) when uniform,
    0 when all the probability sits on one expert."""
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1)


def expert_counts(experts: Tensor, num_experts: int) -> Tensor:
    """Copies sent to each expert: (E,) int64 from (N, K) expert ids (-1 slots ignored)."""
    flat = experts.reshape(-1).long()
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


@dataclass(frozen=True)
class LoadStats:
    """How evenly one layer's copies spread over its experts: the one rule of expert health.

    tokens_per_expert: copies each expert received. share: the same over their sum.
    imbalance: max / mean copies (1 is perfectly even; E means one expert takes everything).
    cv: coefficient of variation, population std / mean of the copies (0 is even).
    dead: experts that received no copy. nearly_dead: experts, dead ones included, below
        `nearly_dead_fraction` of the uniform share (total / E).
    Without any copy, imbalance and cv are NaN (undefined) and every expert is dead.
    """

    tokens_per_expert: list[int]
    share: list[float]
    imbalance: float
    cv: float
    dead: list[int]
    nearly_dead: list[int]

    @property
    def dying(self) -> list[int]:
        """Nearly dead experts that still receive copies (nearly dead, not dead)."""
        return [e for e in self.nearly_dead if e not in self.dead]

    @property
    def heaviest(self) -> int:
        """The expert with the most copies (the lowest id among equals)."""
        counts = self.tokens_per_expert
        return max(range(len(counts)), key=counts.__getitem__)


def load_stats(
    counts: Tensor | Sequence[int], nearly_dead_fraction: float = NEARLY_DEAD_FRACTION
) -> LoadStats:
    """`LoadStats` from copies per expert `counts` (E,)."""
    counts = torch.as_tensor(counts)
    c = counts.double()
    total = float(c.sum())
    mean = total / c.numel()
    if total == 0:
        share = [0.0] * c.numel()
        imbalance = cv = math.nan
    else:
        share = (c / total).tolist()
        imbalance = float(c.max()) / mean
        cv = float(c.std(unbiased=False)) / mean
    return LoadStats(
        tokens_per_expert=[int(x) for x in counts.tolist()],
        share=share,
        imbalance=imbalance,
        cv=cv,
        dead=[e for e, x in enumerate(counts.tolist()) if x == 0],
        nearly_dead=[
            e for e, x in enumerate(c.tolist()) if x == 0 or x < nearly_dead_fraction * mean
        ],
    )


def dropped_at_capacity(group_counts: Tensor, capacity: int | Tensor) -> int:
    """Copies over capacity: sum over groups and experts of max(0, copies - capacity).

    `group_counts` (G, E) copies per expert in each group the capacity applies to (a batch,
    or a sequence), `capacity` one int or (G,) per group. Which copies go (the lightest or the
    latest) does not change how many do."""
    cap = torch.as_tensor(capacity, dtype=torch.long)
    if cap.dim() == 1:
        cap = cap.unsqueeze(1)
    return int((group_counts.long() - cap).clamp_min(0).sum())


def capacity_drops(trace: RoutingTrace, layer: int, cfg: MoEConfig, capacity_factor: float) -> int:
    """Copies of `layer` that moekit's capacity rule (`MoEConfig.capacity`) would drop with
    `capacity_factor`, applied to each batch of the trace (priority "weight") or each row
    (priority "position"), as the training forward pass does."""
    capped = dataclasses.replace(cfg, capacity_factor=capacity_factor)
    counts = trace.layers[layer].row_counts
    if cfg.capacity_priority == "position":
        caps = [capped.capacity(int(n)) for n in trace.row_lengths]
        return dropped_at_capacity(counts, torch.tensor(caps))
    batches = int(trace.row_batch.max()) + 1 if trace.row_batch.numel() else 0
    per_batch = torch.zeros(batches, counts.shape[1], dtype=torch.long)
    per_batch.index_add_(0, trace.row_batch, counts.long())
    tokens = torch.zeros(batches, dtype=torch.long)
    tokens.index_add_(0, trace.row_batch, trace.row_lengths)
    caps = [capped.capacity(int(n)) for n in tokens]
    return dropped_at_capacity(per_batch, torch.tensor(caps))


# ----------------------------------------------------------------------------- co-activation


def coactivation(experts: Tensor, num_experts: int) -> Tensor:
    """(E, E) int64: entry [i, j] counts tokens that chose both i and j; the diagonal [i, i]
    counts tokens that chose i. Symmetric. `experts` (N, K), -1 in empty slots."""
    exp = experts.long()
    onehot = torch.zeros(exp.shape[0], num_experts + 1, dtype=torch.float64)
    onehot.scatter_(1, torch.where(exp >= 0, exp, num_experts), 1.0)
    chosen = onehot[:, :num_experts]
    return (chosen.T @ chosen).round().long()


def conditional_coactivation(counts: Tensor) -> Tensor:
    """(E, E) float: [i, j] = P(j chosen | i chosen) = counts[i, j] / counts[i, i], diagonal 0.
    With K experts per token picked uniformly at random every off-diagonal entry would be
    (K - 1) / (E - 1)."""
    c = counts.double()
    cond = c / c.diagonal().clamp_min(1).unsqueeze(1)
    cond.fill_diagonal_(0.0)
    return cond


def top_pairs(counts: Tensor, n: int = 10) -> list[tuple[int, int, int]]:
    """The `n` most frequent expert pairs (i < j, tokens that chose both), most frequent first."""
    e = counts.shape[0]
    i, j = torch.triu_indices(e, e, offset=1)
    values = counts[i, j]
    k = min(n, int((values > 0).sum()))
    order = values.topk(k).indices.tolist() if k else []
    return [(int(i[o]), int(j[o]), int(values[o])) for o in order]


# ----------------------------------------------------------------------------- consistency


def jaccard(a: Tensor, b: Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of the experts used (count > 0) in two (E,) count vectors; 1 when
    both are empty."""
    sa, sb = a > 0, b > 0
    union = int((sa | sb).sum())
    return 1.0 if union == 0 else int((sa & sb).sum()) / union


def weighted_jaccard(a: Tensor, b: Tensor) -> float:
    """Σ min(p, q) / Σ max(p, q) of the usage shares p = a / Σa and q = b / Σb (Ruzicka
    similarity): 1 for the same mix of experts, 0 for disjoint sets; unlike plain Jaccard it
    does not saturate when a long prompt touches every expert at least once."""
    p = a.double() / a.sum().clamp_min(1)
    q = b.double() / b.sum().clamp_min(1)
    top = float(torch.maximum(p, q).sum())
    return 1.0 if top == 0 else float(torch.minimum(p, q).sum()) / top


@dataclass(frozen=True)
class Consistency:
    """Expert overlap of paired prompts against unrelated ones, for one layer.

    paraphrase_*: mean over the pairs (a_i, b_i). unrelated_*: mean over every mismatched
    pair (a_i, b_j), i != j (None with fewer than two pairs). *_jaccard uses the sets of experts
    each prompt used over all its tokens; *_weighted the weighted Jaccard of the usage counts.
    same_category_weighted: the weighted overlap of mismatched pairs whose two pairs share a
    category (same topic, different meaning; None when no category has two pairs), a stricter
    reference than unrelated pairs from any topic. per_pair: the weighted overlap of each pair.
    """

    paraphrase_jaccard: float
    unrelated_jaccard: float | None
    paraphrase_weighted: float
    unrelated_weighted: float | None
    same_category_weighted: float | None
    per_pair: list[float]


def consistency(
    usage_a: Tensor, usage_b: Tensor, categories: Sequence[str] | None = None
) -> Consistency:
    """`Consistency` from (P, E) expert counts of the first and second prompt of P pairs;
    `categories` (one per pair) enables `same_category_weighted`."""
    if usage_a.shape != usage_b.shape or usage_a.dim() != 2 or usage_a.shape[0] == 0:
        raise ValueError(
            f"usage_a and usage_b must both be (P, E) with P >= 1; got {tuple(usage_a.shape)} "
            f"and {tuple(usage_b.shape)}"
        )
    p = usage_a.shape[0]
    if categories is not None and len(categories) != p:
        raise ValueError(f"categories has {len(categories)} entries for {p} pairs")
    same_j = [jaccard(usage_a[i], usage_b[i]) for i in range(p)]
    same_w = [weighted_jaccard(usage_a[i], usage_b[i]) for i in range(p)]
    other = [(i, j) for i in range(p) for j in range(p) if i != j]
    other_j = [jaccard(usage_a[i], usage_b[j]) for i, j in other]
    other_w = [weighted_jaccard(usage_a[i], usage_b[j]) for i, j in other]
    near = [w for (i, j), w in zip(other, other_w, strict=True)
            if categories is not None and categories[i] == categories[j]]  # fmt: skip
    return Consistency(
        paraphrase_jaccard=_mean(same_j),
        unrelated_jaccard=_mean(other_j) if other else None,
        paraphrase_weighted=_mean(same_w),
        unrelated_weighted=_mean(other_w) if other else None,
        same_category_weighted=_mean(near) if near else None,
        per_pair=same_w,
    )


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


@torch.no_grad()
def prompt_usage(
    model: Transformer, prompts: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 16
) -> dict[int, Tensor]:
    """Expert counts of each prompt: {layer: (P, E)}, with inference routing.

    Prompts run `batch_size` at a time, padded on the right with `pad_id`: under causal
    attention and causal routing a real token never sees the padding after it, so each
    prompt's routing is what it would be alone; padded positions are not counted. Prompts
    longer than the model's `max_seq_len` keep their last tokens. Raises ValueError for an
    empty prompt or a model without MoE layers."""
    moe_layers = model.moe_layers()
    if not moe_layers:
        raise ValueError("the model has no MoE layers: there is no routing to analyse")
    num_experts = next(iter(moe_layers.values())).cfg.num_experts
    device = next(model.parameters()).device
    model.eval()
    usage = {i: torch.zeros(len(prompts), num_experts, dtype=torch.long) for i in moe_layers}
    for p, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {p} encodes to no tokens")
    rows = [list(ids)[-model.cfg.max_seq_len :] for ids in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for r, ids in enumerate(chunk):
            batch[r, : len(ids)] = torch.tensor(ids)
        real = torch.arange(width) < torch.tensor([len(r) for r in chunk]).unsqueeze(1)
        out = model(batch.to(device), causal_routing=True, return_routing=True)
        for i in moe_layers:
            routing = out.moe_stats[i].routing
            assert routing is not None  # asked for with return_routing=True
            chosen = routing.experts.cpu().view(len(chunk), width, -1)
            for r in range(len(chunk)):
                usage[i][start + r] = expert_counts(chosen[r][real[r]], num_experts)
    return usage
