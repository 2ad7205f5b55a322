"""Speculative decoding: cheap guesses of the next few tokens, checked by the model in one pass.

Each step a drafter proposes k tokens after the text so far: prompt lookup (`ngram`: find the
latest earlier occurrence of the last n tokens in the prompt and output, and propose the tokens
that followed it) or a small draft model (`draft`: a model directory with the same tokenizer,
decoding k tokens greedily or by sampling). The target model then runs once over the last
chosen token and the k drafts (k + 1 positions through its KV cache), which gives its own
distribution at each of them. Drafts are accepted from the left while the target agrees; at the
first disagreement the target's own choice replaces the draft, and when all k are accepted the
target's distribution after the last one gives one more token for free. The rejected drafts
are dropped from the KV cache (`KVCache.truncate_row`).

Greedy decoding accepts a draft when it is the target's argmax, so the output is token for
token what plain greedy decoding gives. Sampling uses the speculative-sampling rule (Leviathan
et al. 2023; Chen et al. 2023): accept a draft d with probability min(1, p(d) / q(d)), and on a
rejection draw from the normalised max(0, p - q); p and q are the target's and the drafter's
distributions after the same repetition penalty, temperature and top-k / top-p / min-p
filtering, and for prompt lookup q is a point mass on the draft. Each token is then
distributed exactly as under plain sampling (the seeded draws differ, so a seed does not
reproduce plain sampling's text).

Prompts of a batch are decoded one after another (rows accept different numbers of tokens).
"""

from __future__ import annotations

from collections.abc import Generator as Steps
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.infer.detokenize import TextTracker
from moekit.infer.generate import (
    Chunk,
    Completion,
    ContextLengthError,
    GeneratedToken,
    Generator,
    check_fits,
)
from moekit.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_generator,
)
from moekit.model import ModelOutput, Transformer
from moekit.nn.kv_cache import KVCache
from moekit.validate import check_choice, check_field_types, fail

METHODS = ("ngram", "draft")
MAX_DRAFT_TOKENS = 16
MAX_NGRAM = 8


@dataclass(kw_only=True)
class SpeculativeConfig:
    """How to speculate.

    method: "ngram" (prompt lookup: no second model) or "draft" (a small draft model).
    num_draft_tokens: tokens proposed per step, k (1 <= k <= 16); the target checks k + 1
    positions per pass. ngram: prompt lookup matches the last `ngram` tokens first, then
    shorter suffixes down to one token (1 <= ngram <= 8). draft_dir: the draft model's
    directory (method "draft" only); it must share the target's tokenizer.
    """

    method: str = "ngram"
    num_draft_tokens: int = 4
    ngram: int = 3
    draft_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.draft_dir, Path):
            self.draft_dir = str(self.draft_dir)
        check_field_types(self)
        owner = "SpeculativeConfig"
        check_choice(owner, "method", self.method, METHODS)
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            allowed = f"must be in [1, {MAX_DRAFT_TOKENS}]"
            raise fail(owner, "num_draft_tokens", self.num_draft_tokens, allowed)
        if not 1 <= self.ngram <= MAX_NGRAM:
            raise fail(owner, "ngram", self.ngram, f"must be in [1, {MAX_NGRAM}]")
        if self.method == "draft" and not self.draft_dir:
            raise fail(owner, "draft_dir", self.draft_dir, "method 'draft' needs a draft model")
        if self.method != "draft" and self.draft_dir:
            raise fail(
                owner, "draft_dir", self.draft_dir, f"only method 'draft' takes a draft model "
                f"(method is {self.method!r})"
            )  # fmt: skip


@dataclass
class SpeculativeStats:
    """Counts over the steps of speculative decoding, for `moekit bench generate`.

    With `experts` on, each verify pass records its routing: `verify_experts` sums, over
    passes and MoE layers, the distinct experts the pass's k + 1 tokens used, and
    `single_experts` those of its first token alone (what a one-token decode step uses)."""

    experts: bool = False
    steps: int = 0  # forward passes of the target, the prefill included
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens emitted (the first, from the prefill, included)
    verify_tokens: int = 0  # positions the verify passes ran
    layer_passes: int = 0  # (verify pass, MoE layer) pairs with recorded routing
    verify_experts: int = 0
    single_experts: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per forward pass of the target (1.0: what plain decoding gets)."""
        return self.tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_step": self.tokens_per_step,
        }


# ---- drafting ---------------------------------------------------------------------------------


def ngram_draft(context: Sequence[int], k: int, n: int) -> list[int]:
    """Prompt lookup: the (up to) `k` tokens that followed the latest earlier occurrence of the
    last `n` tokens of `context`, trying shorter suffixes down to one token; [] when none
    occurs earlier."""
    size = len(context)
    for m in range(min(n, size - 1), 0, -1):
        suffix = list(context[size - m :])
        for start in range(size - m - 1, -1, -1):  # latest first; not the suffix itself
            if list(context[start : start + m]) == suffix:
                return list(context[start + m : start + m + k])
    return []


class DraftModel:
    """A small model that proposes tokens, with its own one-row KV cache that it keeps in step
    with the text it is asked to continue (only the tokens it has not seen are fed)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache: KVCache | None = None
        self.fed: list[int] = []  # the tokens in the cache

    def start(self, total: int) -> None:
        """A fresh cache for a request of at most `total` tokens."""
        self.check_fits(total)
        self.cache = KVCache(self.model.cfg, 1, total, device=self.device, dtype=self.dtype)
        self.fed = []

    def check_fits(self, total: int) -> None:
        """ContextLengthError unless a request of `total` tokens fits the draft model."""
        if total > self.model.cfg.max_seq_len:
            raise ContextLengthError(
                f"the draft model's maximum context length is {self.model.cfg.max_seq_len} "
                f"tokens, but {total} were requested; ask for fewer tokens or use a draft "
                "model with a longer context"
            )

    def propose(
        self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator
    ) -> tuple[list[int], Tensor | None]:
        """`k` draft tokens after `context`, and (when sampling) the (k, V) distributions they
        were drawn from; under greedy decoding each is the draft model's argmax."""
        logits = self._sync(context)
        drafts: list[int] = []
        dists: list[Tensor] = []
        for i in range(k):
            seen = context + drafts
            if params.temperature == 0.0:
                token = int(_penalised(logits, params, seen).argmax())
            else:
                probs = processed_probs(logits, params, seen)
                token = draw(probs, gen)
                dists.append(probs)
            drafts.append(token)
            if i < k - 1:
                logits = self._feed([token])
        return drafts, torch.stack(dists) if dists else None

    def _sync(self, context: list[int]) -> Tensor:
        """Bring the cache to `context` (keeping the common prefix of what it holds) and return
        the logits after it."""
        assert self.cache is not None, "call start() first"
        common = 0
        limit = min(len(self.fed), len(context) - 1)  # feed at least the last token
        while common < limit and self.fed[common] == context[common]:
            common += 1
        self.cache.truncate_row(0, common)
        del self.fed[common:]
        return self._feed(context[common:])

    def _feed(self, tokens: list[int]) -> Tensor:
        assert self.cache is not None
        out = self.model(
            torch.tensor([tokens], device=self.device),
            cache=self.cache,
            causal_routing=True,
            routing_stats=False,
            last_logits=True,
        )
        self.fed += tokens
        return out.logits[0, -1].float()


def load_draft_model(draft_dir: str | Path, target: Generator) -> DraftModel:
    """The draft model in `draft_dir`, on the target's device and in its dtype, after checking
    that it speaks the target's tokenizer (a ValueError naming the difference otherwise)."""
    from moekit.data.tokenizer import Tokenizer
    from moekit.model_dir import ModelDir, load_model

    if not ModelDir(draft_dir).config_path.is_file():
        raise FileNotFoundError(f"the draft model {str(draft_dir)!r} is not a model directory")
    try:
        tokenizer = Tokenizer.load(draft_dir)
    except FileNotFoundError as e:
        raise ValueError(f"the draft model {str(draft_dir)!r} has no tokenizer ({e})") from None
    check_same_tokenizer(target.tokenizer, tokenizer, str(draft_dir))
    model = load_model(draft_dir, device=target.device, dtype=target.dtype)
    cfg = model.cfg
    if cfg.vocab_size != target.model.cfg.vocab_size:
        raise ValueError(
            f"the draft model {str(draft_dir)!r} has vocab_size {cfg.vocab_size}, the target "
            f"{target.model.cfg.vocab_size}: speculative decoding needs the same vocabulary"
        )
    return DraftModel(model)


def check_same_tokenizer(target: Any, draft: Any, name: str) -> None:
    """Raise a ValueError naming the first difference between two tokenizers' vocabularies
    (size, a token's id) or special tokens; `name` names the draft model in the message."""
    where = f"the draft model {name!r} has another tokenizer than the target"
    if target.vocab_size != draft.vocab_size:
        raise ValueError(f"{where}: {draft.vocab_size} tokens against {target.vocab_size}")
    ours, theirs = target.backend.get_vocab(), draft.backend.get_vocab()
    for token, i in sorted(ours.items(), key=lambda item: item[1]):
        if theirs.get(token) != i:
            other = theirs.get(token)
            had = "lacks it" if other is None else f"has it as id {other}"
            raise ValueError(f"{where}: the target's token {token!r} is id {i}, the draft {had}")
    for what in ("eos_id", "pad_id", "bos_id"):
        if getattr(target, what) != getattr(draft, what):
            raise ValueError(
                f"{where}: {what} {getattr(draft, what)} against {getattr(target, what)}"
            )


# ---- the acceptance rule ----------------------------------------------------------------------


def _penalised(logits_V: Tensor, params: SamplingParams, seen: Sequence[int]) -> Tensor:
    if params.repetition_penalty == 1.0 or not seen:
        return logits_V
    ids = torch.tensor(list(seen), device=logits_V.device)
    return apply_repetition_penalty(logits_V, ids, params.repetition_penalty)


def processed_probs(logits_V: Tensor, params: SamplingParams, seen: Sequence[int]) -> Tensor:
    """The distribution plain sampling draws from (`sampling.next_token`): repetition
    penalty over `seen`, temperature, then top-k, top-p and min-p."""
    logits_V = _penalised(logits_V.float(), params, seen) / params.temperature
    return filter_logits(logits_V, params.top_k, params.top_p, params.min_p).softmax(-1)


def draw(probs_V: Tensor, gen: torch.Generator) -> int:
    """A draw from `probs_V` (the exponential race, as `sampling.next_token` draws)."""
    race = torch.empty_like(probs_V).exponential_(generator=gen)
    return int((probs_V / race).argmax())


def accept_greedy(
    logits: Tensor, drafts: list[int], params: SamplingParams, context: list[int]
) -> list[int]:
    """Greedy verification: the drafts the target's argmax agrees with, from the left, then
    the target's own argmax at the first disagreement (or after the last draft).
    `logits` (k + 1, V): row i is the target's logits after `context` + drafts[:i]."""
    if params.repetition_penalty == 1.0:
        best = logits.argmax(-1).tolist()
    else:
        best = [
            int(_penalised(logits[i], params, context + drafts[:i]).argmax())
            for i in range(len(drafts) + 1)
        ]
    out: list[int] = []
    for draft, target in zip(drafts, best, strict=False):
        if draft != target:
            break
        out.append(draft)
    out.append(best[len(out)])
    return out


def accept_sampled(
    logits: Tensor,
    drafts: list[int],
    q: Tensor | None,
    params: SamplingParams,
    context: list[int],
    gen: torch.Generator,
) -> list[int]:
    """Speculative sampling: draft i is kept with probability min(1, p_i(d) / q_i(d)); the
    first rejected one is replaced by a draw from the normalised max(0, p_i - q_i); when all
    are kept, one more token is drawn from p_k. `q` (k, V) holds the draft distributions
    (None: prompt lookup, a point mass on each draft)."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        p = processed_probs(logits[i], params, context + out)
        q_d = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand((), generator=gen, device=p.device))
        if u * q_d < float(p[d]):
            out.append(d)
            continue
        if q is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - q[i]).clamp_min(0.0)
        total = float(residual.sum())
        out.append(draw(residual / total if total > 0 else p, gen))
        return out
    out.append(draw(processed_probs(logits[len(drafts)], params, context + out), gen))
    return out


# ---- the decoding loop ------------------------------------------------------------------------


class Speculator:
    """Speculative decoding for a `Generator`: set `generator.speculative =
    Speculator(generator, config)` and its `generate` and `stream` speculate. A draft model is
    loaded here, once, and checked against the generator's tokenizer."""

    def __init__(
        self,
        generator: Generator,
        config: SpeculativeConfig,
        *,
        stats: SpeculativeStats | None = None,
    ) -> None:
        self.config = config
        self.stats = stats or SpeculativeStats()
        self.draft: DraftModel | None = None
        if config.method == "draft":
            assert config.draft_dir is not None
            self.draft = load_draft_model(config.draft_dir, generator)

    def run(
        self,
        generator: Generator,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams,
        done: list[Completion],
    ) -> Iterator[tuple[int, Chunk]]:
        """Decode each prompt in turn; yields (row, Chunk) as `Generator._run` does."""
        if params.return_routing:
            raise ValueError(
                "return_routing is not available with speculative decoding (a token's "
                "routing is recorded by the pass that feeds it, which verification replaces)"
            )
        ids = [generator.encode(p) for p in prompts]
        for seq in ids:
            check_fits(len(seq), params.max_new_tokens, generator.max_seq_len)
            if self.draft is not None:
                self.draft.check_fits(len(seq) + params.max_new_tokens)
        for b, seq in enumerate(ids):
            yield from ((b, chunk) for chunk in _Request(self, generator, seq, params, done[b]))


class _Request:
    """One prompt decoded speculatively; iterating yields its chunks."""

    def __init__(
        self,
        spec: Speculator,
        generator: Generator,
        prompt: list[int],
        params: SamplingParams,
        done: Completion,
    ) -> None:
        self.spec, self.gen, self.params, self.done = spec, generator, params, done
        self.prompt = prompt
        done.prompt_tokens = len(prompt)
        self.context = list(prompt)
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= generator.eos_ids
        self.rng = make_generator(params.seed, generator.device)
        self.tracker = TextTracker(generator.tokenizer, params.stop, context=prompt)
        total = len(prompt) + params.max_new_tokens
        self.cache = KVCache(
            generator.model.cfg, 1, total, device=generator.device, dtype=generator.dtype
        )
        if spec.draft is not None:
            spec.draft.start(total)

    def __iter__(self) -> Iterator[Chunk]:
        params, stats = self.params, self.spec.stats
        logits = self._target(self.context, prefill=True)
        drafts: list[int] = []
        q: Tensor | None = None
        while True:
            before = len(self.context) - 1  # cache positions before this pass's tokens
            if params.temperature == 0.0:
                chosen = accept_greedy(logits, drafts, params, self.context)
            else:
                chosen = accept_sampled(logits, drafts, q, params, self.context, self.rng)
            if drafts:
                stats.drafted += len(drafts)
                stats.accepted += len(chosen) - 1
                # The cache holds the previous token and every draft; keep the accepted ones.
                self.cache.truncate_row(0, before + len(chosen))
            for i, token in enumerate(chosen):
                finish = yield from self._emit(token, logits[i])
                if finish is not None:
                    yield self._close(finish)
                    return
            remaining = params.max_new_tokens - len(self.done.token_ids)
            drafts, q = self._propose(min(self.spec.config.num_draft_tokens, remaining - 1))
            logits = self._target(self.context[-1:] + drafts, prefill=False)

    def _propose(self, k: int) -> tuple[list[int], Tensor | None]:
        if k <= 0:
            return [], None
        if self.spec.draft is not None:
            return self.spec.draft.propose(self.context, k, self.params, self.rng)
        return ngram_draft(self.context, k, self.spec.config.ngram), None

    def _target(self, tokens: list[int], *, prefill: bool) -> Tensor:
        """The target's logits (n, V) at every position of `tokens` fed through the cache (the
        last position only for the prefill)."""
        stats = self.spec.stats
        record = stats.experts and not prefill
        out = self.gen.model(
            torch.tensor([tokens], device=self.gen.device),
            cache=self.cache,
            causal_routing=True,
            top_k=self.params.experts_per_token,
            return_routing=record,
            routing_stats=False,
            last_logits=prefill,
        )
        stats.steps += 1
        if not prefill:
            stats.verify_tokens += len(tokens)
        if record:
            _count_experts(out, stats)
        return out.logits[0].float()

    def _emit(self, token: int, logits_V: Tensor) -> Steps[Chunk, None, str | None]:
        """Add `token` to the output as plain decoding would, yielding its chunk; returns the
        finish reason when the output ends here (a stop token is not added)."""
        if token in self.stop_ids:
            return "stop"
        self.context.append(token)
        self.done.token_ids.append(token)
        self.spec.stats.tokens += 1
        logprob = float(torch.log_softmax(logits_V, -1)[token])
        gen = GeneratedToken(id=token, text=self.tracker.add(token), logprob=logprob)
        self.done.tokens.append(gen)
        yield Chunk(gen.text, gen)
        if self.tracker.stopped:
            return "stop"
        if len(self.done.token_ids) >= self.params.max_new_tokens:
            return "length"
        return None

    def _close(self, reason: str) -> Chunk:
        tail = self.tracker.flush()
        self.done.text = self.tracker.text
        self.done.finish_reason = reason
        return Chunk(tail, None, reason)


def _count_experts(out: ModelOutput, stats: SpeculativeStats) -> None:
    for layer_stats in out.moe_stats.values():
        assert layer_stats.routing is not None
        experts = layer_stats.routing.experts  # (T, K), -1 where a slot is unused
        stats.layer_passes += 1
        stats.verify_experts += int(experts[experts >= 0].unique().numel())
        first = experts[0]
        stats.single_experts += int(first[first >= 0].unique().numel())
