"""Text generation with a KV cache: batched, streaming, with an optional routing trace.

A batch of prompts is left-padded into one tensor; padding is masked out of attention and the
RoPE positions count real tokens only, so each prompt is continued exactly as it would be on
its own. The prompt is prefilled in one forward pass, then tokens are decoded one at a time
through the cache (the MoE layers take their small-batch decode path). Expert-choice models
route causally, as they must when tokens arrive one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from moekit.infer.compiled import CompiledDecoder, cache_length, decode_support
from moekit.infer.defaults import GenerationDefaults
from moekit.infer.detokenize import TextTracker
from moekit.infer.offload import OffloadConfig
from moekit.infer.sampling import SamplingParams, make_generator, next_token
from moekit.model import ModelOutput, Transformer
from moekit.nn.kv_cache import KVCache

log = logging.getLogger("moekit")

Routing = dict[int, list[tuple[int, float]]]  # MoE layer -> [(expert, weight), ...]


@dataclass
class GeneratedToken:
    """One generated token. `text` is the output text it releases (empty while a multi-byte
    character or a possible stop string is incomplete); `routing` is filled when requested."""

    id: int
    text: str
    logprob: float
    routing: Routing | None = None


@dataclass
class Chunk:
    """A piece of streamed output: released text, the token that released it (None for the
    final flush), and on the last chunk of an output the finish reason."""

    text: str
    token: GeneratedToken | None
    finish_reason: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string or stop token) or "length"
    prompt_tokens: int
    tokens: list[GeneratedToken] = field(default_factory=list)


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context."""


def check_fits(
    prompt_tokens: int,
    max_new_tokens: int,
    max_seq_len: int,
    *,
    limit: str = "this model's maximum context length",
) -> None:
    """Raise ContextLengthError unless the prompt plus `max_new_tokens` fit `max_seq_len`
    tokens; `limit` names that bound in the message (a server may set a smaller one)."""
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty")
    if prompt_tokens + max_new_tokens > max_seq_len:
        raise ContextLengthError(
            f"{limit} is {max_seq_len} tokens, but "
            f"{prompt_tokens + max_new_tokens} were requested ({prompt_tokens} in the prompt, "
            f"{max_new_tokens} to generate); shorten the prompt or ask for fewer tokens"
        )


def routing_of(out: ModelOutput, row: int, position: int, seq_len: int) -> Routing:
    """The experts and weights of token (row, position) in every MoE layer of a forward pass
    made with `return_routing=True`, heaviest first."""
    routes: Routing = {}
    t = row * seq_len + position
    for layer, stats in out.moe_stats.items():
        assert stats.routing is not None, "run the model with return_routing=True"
        experts = stats.routing.experts[t].tolist()
        weights = stats.routing.weights[t].tolist()
        pairs = [(e, round(w, 5)) for e, w in zip(experts, weights, strict=True) if e >= 0]
        routes[layer] = sorted(pairs, key=lambda p: -p[1])
    return routes


class Speculation(Protocol):
    """Speculative decoding (`moekit.infer.speculative.Speculator`), set as
    `Generator.speculative`: it decodes in place of the plain loop."""

    def run(
        self,
        generator: Generator,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams,
        done: list[Completion],
    ) -> Iterator[tuple[int, Chunk]]: ...


class Generator:
    """Generates from a model and its tokenizer. Build one with `Generator.from_dir(path)`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        compile: bool = False,
        defaults: GenerationDefaults | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        # The model's own generation settings (generation_config.json): more end-of-sequence
        # ids, sampling defaults for callers that set none.
        self.defaults = defaults or GenerationDefaults()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # The compiled decode step (moekit.infer.compiled), built on first use.
        self.compile = compile
        self._decoder: CompiledDecoder | None = None
        # Speculative decoding, when set (moekit.infer.speculative.Speculator).
        self.speculative: Speculation | None = None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype | None = None,
        offload: OffloadConfig | None = None,
        compile: bool = False,
    ) -> Generator:
        """A generator for the model directory `model_dir`, on `device` ("auto": CUDA when
        present, else the CPU; see `moekit.runtime.resolve_device`). With `offload`, the routed
        experts are paged from the weight files under its memory budget (moekit.infer.offload).
        With `compile`, decode steps run through `torch.compile` where the model allows it
        (moekit.infer.compiled; the first request of each new shape pays the compilation)."""
        from moekit.data.tokenizer import Tokenizer
        from moekit.model_dir import load_model
        from moekit.runtime import resolve_device

        try:  # before the weights: a missing tokenizer should not cost loading them
            tokenizer = Tokenizer.load(model_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}: a model directory written by `moekit quantize --preset` (random weights) "
                "has none; measure it with `moekit bench generate`, which feeds token ids"
            ) from None
        if offload is not None:
            from moekit.infer.offload import load_paged_model

            model = load_paged_model(model_dir, offload, device=resolve_device(device), dtype=dtype)
        else:
            model = load_model(model_dir, device=resolve_device(device), dtype=dtype)
        return cls(model, tokenizer, compile=compile, defaults=GenerationDefaults.load(model_dir))

    @property
    def eos_ids(self) -> set[int]:
        """The ids that end a sequence: the tokenizer's end-of-text token and those the
        model's generation_config.json lists."""
        ids = set(self.defaults.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
    ) -> list[Completion]:
        """Continue each prompt (text or token ids); one `Completion` per prompt, in order.
        Under greedy decoding a batch gives exactly the tokens each prompt gives alone."""
        batch = _as_batch(prompts)
        done = [Completion("", [], "length", 0) for _ in batch]
        for _ in self._run(batch, params or SamplingParams(), done):
            pass
        return done

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[Chunk]:
        """Yield the output of one prompt as it is decided: each `Chunk` carries released
        text and, except for a final flush, the token that released it; the last chunk has the
        finish reason."""
        done = [Completion("", [], "length", 0)]
        for _, chunk in self._run([prompt], params or SamplingParams(), done):
            yield chunk

    # ---- the decoding loop --------------------------------------------------------------
    # Inference mode: like no_grad, and each PyTorch call skips autograd's bookkeeping.
    @torch.inference_mode()
    def _run(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams, done: list[Completion]
    ) -> Iterator[tuple[int, Chunk]]:
        """Decode every prompt; yields (row, Chunk) as output is released and fills `done`.

        With `return_routing`, a token's chunk waits for the forward pass that feeds the token
        back in: that pass is where the token is routed."""
        if self.speculative is not None:
            yield from self.speculative.run(self, prompts, params, done)
            return
        ids = [self.encode(p) for p in prompts]
        for seq in ids:
            check_fits(len(seq), params.max_new_tokens, self.max_seq_len)
        B, L = len(ids), max(len(s) for s in ids)
        pad = self.tokenizer.pad_id
        tokens, valid = self._left_padded(ids)
        for b, seq in enumerate(ids):
            done[b].prompt_tokens = len(seq)
        decoder = self._compiled_decoder(params)
        cache_len = L + params.max_new_tokens
        if decoder is not None:  # a bucketed length: a few shapes cover every request
            cache_len = cache_length(cache_len, self.max_seq_len)
        cache = KVCache(self.model.cfg, B, cache_len, device=self.device, dtype=self.dtype)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        gens = [make_generator(params.seed, self.device) for _ in range(B)]
        penalty = params.repetition_penalty != 1.0  # only then the seen tokens are kept
        seen = [torch.tensor(q if penalty else [], device=self.device).long() for q in ids]
        trackers = [TextTracker(self.tokenizer, params.stop, context=seq) for seq in ids]
        finish: list[str | None] = [None] * B
        pending: list[GeneratedToken | None] = [None] * B

        logits = self._forward(tokens, cache, valid, params).logits[:, -1].float()
        while True:
            # Batched over rows, once per step: the log-probabilities, and greedy choices.
            logprobs = torch.log_softmax(logits, -1)
            greedy = logits.argmax(-1).tolist() if _plain_greedy(params) else []
            next_ids, live = [pad] * B, [False] * B
            for b in range(B):
                if finish[b] is not None:
                    continue
                token = greedy[b] if greedy else next_token(logits[b], params, gens[b], seen[b])
                if token in stop_ids:
                    finish[b] = "stop"
                    yield b, self._close(b, done, trackers[b], "stop")
                    continue
                if penalty:
                    seen[b] = torch.cat([seen[b], seen[b].new_tensor([token])])
                done[b].token_ids.append(token)
                gen = GeneratedToken(
                    id=token, text=trackers[b].add(token), logprob=float(logprobs[b, token])
                )
                done[b].tokens.append(gen)
                if trackers[b].stopped:
                    finish[b] = "stop"
                elif len(done[b].token_ids) >= params.max_new_tokens:
                    finish[b] = "length"
                next_ids[b], live[b] = token, True
                if params.return_routing:
                    pending[b] = gen
                else:
                    yield b, Chunk(gen.text, gen)
                    reason = finish[b]
                    if reason is not None:
                        yield b, self._close(b, done, trackers[b], reason)
            if not any(live) or (not params.return_routing and all(f is not None for f in finish)):
                return
            step = torch.tensor(next_ids, device=self.device).view(B, 1)
            step_valid = torch.tensor(live, device=self.device).view(B, 1)
            compiled = None
            if decoder is not None:
                compiled = decoder.step(step, cache, step_valid, params.experts_per_token)
            if compiled is not None:
                logits = compiled
                continue
            out = self._forward(step, cache, step_valid, params)
            logits = out.logits[:, -1].float()
            yield from self._release_routed(out, pending, finish, done, trackers)

    def _release_routed(
        self,
        out: ModelOutput,
        pending: list[GeneratedToken | None],
        finish: list[str | None],
        done: list[Completion],
        trackers: list[TextTracker],
    ) -> Iterator[tuple[int, Chunk]]:
        """Give the tokens waiting for their routing the routing of pass `out`, and release
        them (with their row's final chunk when the row has finished)."""
        for b, waiting in enumerate(pending):
            if waiting is None:
                continue
            pending[b] = None
            waiting.routing = routing_of(out, b, 0, 1)
            yield b, Chunk(waiting.text, waiting)
            reason = finish[b]
            if reason is not None:
                yield b, self._close(b, done, trackers[b], reason)

    def _left_padded(self, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """The prompts left-padded into one (B, L) tensor, and the mask of real tokens."""
        B, L = len(ids), max(len(s) for s in ids)
        tokens = torch.full((B, L), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        for b, seq in enumerate(ids):
            tokens[b, L - len(seq) :] = torch.tensor(seq, device=self.device)
            valid[b, L - len(seq) :] = True
        return tokens, valid

    def _compiled_decoder(self, params: SamplingParams) -> CompiledDecoder | None:
        """The compiled decode step for this request, or None (compilation off, a routing
        trace asked for, or a model the compiled step does not cover)."""
        if not self.compile or params.return_routing:
            return None
        if self._decoder is None:
            self._decoder = CompiledDecoder(self.model)
        else:  # checked again per request: adapters or hooks may have been added since
            self._decoder.reason = decode_support(self.model)
        if self._decoder.reason is not None:
            log.info("compiled decoding is off for this model: %s", self._decoder.reason)
        return self._decoder if self._decoder.active else None

    @staticmethod
    def _close(b: int, done: list[Completion], tracker: TextTracker, reason: str) -> Chunk:
        tail = tracker.flush()
        done[b].text = tracker.text
        done[b].finish_reason = reason
        return Chunk(tail, None, reason)

    def _forward(
        self, tokens: Tensor, cache: KVCache, valid: Tensor, params: SamplingParams
    ) -> ModelOutput:
        return self.model(
            tokens,
            cache=cache,
            valid=valid,
            causal_routing=True,
            top_k=params.experts_per_token,
            return_routing=params.return_routing,
            routing_stats=False,
            last_logits=True,
        )


def _plain_greedy(params: SamplingParams) -> bool:
    """Whether the next token is the argmax of the logits as they are (`next_token` under
    greedy decoding without a repetition penalty), which one batched call decides."""
    return params.temperature == 0.0 and params.repetition_penalty == 1.0


def _as_batch(
    prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
) -> list[str | Sequence[int]]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(p, int) for p in items):
        return [items]  # type: ignore[list-item]
    if not items:
        raise ValueError("no prompts given")
    return items  # type: ignore[return-value]


@torch.inference_mode()
def greedy_generate(
    model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, eos_id: int | None = None
) -> list[int]:
    """Greedy continuation of `prompt_ids` with a KV cache: the new token ids only, stopping
    at `eos_id` or when the context is full."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    if budget <= 0:
        return []
    cache = KVCache(
        model.cfg, 1, len(prompt_ids) + budget, device=device, dtype=next(model.parameters()).dtype
    )
    new: list[int] = []
    try:
        logits = model(
            torch.tensor([prompt_ids], device=device),
            cache=cache,
            causal_routing=True,
            routing_stats=False,
            last_logits=True,
        ).logits
        for _ in range(budget):
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
            if len(new) == budget:
                break
            logits = model(
                torch.tensor([[token]], device=device),
                cache=cache,
                causal_routing=True,
                routing_stats=False,
            ).logits
    finally:
        model.train(was_training)
    return new
