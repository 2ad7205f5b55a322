"""Admission: turning a validated API request into engine requests, or into the APIError
that says why not.

protocol.py checks what can be checked from the body alone; this module checks the rest
against the served model and engine (the model name, the queue's size, token ids, the
context, `max_tokens`, experts per token), tokenizes the prompts, builds each choice's
sampling parameters and submits the whole request, translating the engine's refusals (a full
queue, a stopped engine) into the API's errors.

Tokenizing takes about a second per megabyte of text, so it runs in a worker thread (the event
loop keeps answering /health and streaming other answers meanwhile), after a check that needs
only the prompt's length: a prompt whose characters alone prove it cannot fit the context is
refused without being tokenized (see `moekit.infer.token_bound`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from moekit.infer.chat import ChatTemplate, PromptTemplate
from moekit.infer.constrain import ConstraintError, Grammar
from moekit.infer.generate import ContextLengthError
from moekit.infer.sampling import SamplingParams
from moekit.infer.token_bound import TokenBound
from moekit.infer.tool_calls import detect_tool_parser, tool_parser
from moekit.serve import replay
from moekit.serve.config import ServerConfig
from moekit.serve.engine import (
    Engine,
    EngineRequest,
    EngineStoppedError,
    QueueFullError,
    RequestTooLargeError,
)
from moekit.serve.protocol import APIError, ChatRequest, MoekitOptions
from moekit.serve.streams import EventStream, Submitted
from moekit.serve.structured import compile_for
from moekit.serve.tools import (
    ToolPlan,
    forced_schema,
    plan_tools,
    template_messages,
    template_tools,
)


@dataclass
class Job:
    """One choice to generate: prompt ids, sampling, logprob alternatives (None: no logprobs),
    whether the prompt's logprobs are wanted too (echo), and whether it only scores its
    prompt (generating nothing)."""

    ids: list[int]
    params: SamplingParams
    logprobs: int | None = None
    echo_logprobs: bool = False
    prompt_only: bool = False
    grammar: Grammar | None = None  # the output constraint (moekit.serve.structured)
    routed_experts: Tensor | None = None  # a routing to replay (serve/replay.py)
    return_routed_experts: bool = False


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completion's `prompt` as a list of prompts (a string or ids, or a list of those)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def with_seed(params: SamplingParams, seed: int | None, choice: int) -> SamplingParams:
    """Choice i of a seeded request samples with seed + i (reproducible, yet different)."""
    return params if seed is None else dataclasses.replace(params, seed=seed + choice)


def context_error(e: ContextLengthError, param: str) -> APIError:
    return APIError(400, str(e), param=param, code="context_length_exceeded")


class Admission:
    """The checks and the submission for one engine, under one server config."""

    def __init__(
        self, engine: Engine, config: ServerConfig, template: PromptTemplate | None = None
    ) -> None:
        self.engine, self.config = engine, config
        self.template: PromptTemplate = template or ChatTemplate()
        # The format the model writes tool calls in: the server's setting, else the one its
        # chat template shows.
        if config.tool_call_format is not None:
            self.tool_parser = tool_parser(config.tool_call_format)
        else:
            self.tool_parser = detect_tool_parser(getattr(self.template, "source", None))
        self.tokenizer, self.cfg = engine.tokenizer, engine.cfg
        self.limit = config.max_tokens_limit or engine.max_context  # on max_tokens
        self.bound = TokenBound(self.tokenizer)

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_size(self, generations: int, n: int) -> None:
        """A request is queued whole: one bigger than the queue could never start."""
        max_queue = self.engine.max_queue
        if generations > max_queue:
            raise APIError(
                400,
                f"this request asks for {generations} generations (prompts x n) but the server "
                f"queues at most {max_queue} at once (its max_queue setting); send fewer prompts "
                "or a smaller n",
                param="n" if n > 1 else "prompt",
                code="request_too_large",
            )

    async def encode_all(self, prompts: list[str | list[int]], param: str) -> list[list[int]]:
        """Every prompt's token ids, tokenized in a worker thread (see `encode`)."""
        return await asyncio.to_thread(lambda: [self.encode(p, param) for p in prompts])

    def tool_plan(self, req: ChatRequest) -> ToolPlan:
        """How the request's answer is made and read with its tools (a 400 when its tools,
        tool_choice and messages do not fit together)."""
        return plan_tools(req, self.tool_parser)

    def forced_grammar(self, req: ChatRequest, plan: ToolPlan) -> Grammar | None:
        """The compiled constraint a forced tool call's answer follows (None when no call is
        forced); compiled here, in the request's thread, so a schema the constraint library
        cannot take is a 400 before anything is queued."""
        if plan.mode != "forced":
            return None
        schema = forced_schema(req, plan)
        try:
            return compile_for(self.engine, "json_schema", schema, ignore_eos=req.ignore_eos)
        except ConstraintError as e:
            raise APIError(400, f"the tool's parameters: {e}", param="tools") from None

    async def chat_ids(self, req: ChatRequest) -> list[int]:
        """The chat's messages formatted by the model's chat template, as token ids (formatted
        and tokenized in a worker thread)."""
        return await asyncio.to_thread(self._chat_ids, req)

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """A prompt's token ids (text is tokenized, ids are checked against the vocabulary).
        Text whose length alone proves it cannot fit the context is refused untokenized."""
        vocab = self.cfg.vocab_size
        ids: list[int]
        if isinstance(prompt, str):
            self._check_length(prompt, param)
            ids = self.tokenize(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return ids

    def tokenize(self, text: str) -> list[int]:
        """`tokenizer.encode_prompt(text)`, through the batch encoder: the tokenizers library
        lets other threads run while it encodes a batch, not while it encodes one text."""
        return [*self.tokenizer.prompt_prefix, *self.tokenizer.encode_batch([text])[0]]

    def _check_length(self, text: str, param: str) -> None:
        try:
            self.engine.check_prompt_size(len(text), self.bound.at_least(text))
        except ContextLengthError as e:
            raise context_error(e, param) from None

    def _chat_ids(self, req: ChatRequest) -> list[int]:
        try:
            prompt = self.template.format(template_messages(req), tools=template_tools(req))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not self.template.includes_special_tokens:
            return self.encode(prompt, "messages")
        self._check_length(prompt, "messages")
        ids = self.tokenizer.encode_batch([prompt])[0]  # the template wrote the special tokens
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages")
        return ids

    def sampling(
        self,
        req: Any,
        max_tokens: int | None,
        prompt_len: int,
        prompt_param: str,
        *,
        scoring: bool = False,
    ) -> SamplingParams:
        """The sampling parameters for a completion or chat request `req` whose prompt has
        `prompt_len` tokens; `max_tokens` None means as many as fit. `scoring`: the request
        only scores its prompt (`max_tokens` 0 with `echo`), so the prompt alone must fit;
        nothing is sampled."""
        if scoring:
            self._check_fits(prompt_len, 0, prompt_param)
            max_tokens = 1  # what SamplingParams asks for; the engine generates none
        else:
            max_tokens = self._max_tokens(max_tokens, prompt_len, prompt_param)
        self._check_experts(req.moekit.top_k)
        vocab = self.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.stop_token_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        # Fields the request leaves out take the model's own defaults (generation_config.json).
        model = self.engine.generator.defaults.sampling()
        chosen = {
            name: model[name] if name in model and name not in req.model_fields_set
            else getattr(req, name)
            for name in ("temperature", "top_p", "top_k", "repetition_penalty")
        }  # fmt: skip
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                min_p=req.min_p,
                **chosen,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                experts_per_token=req.moekit.top_k,
                return_routing=req.moekit.routing,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def chat_sampling(self, req: ChatRequest, prompt_len: int) -> SamplingParams:
        """A chat request's sampling: its own stops, and the template's end-of-turn ones."""
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        params = self.sampling(req, max_tokens, prompt_len, "messages")
        try:
            return dataclasses.replace(params, stop=[*params.stop, *self.template.stop])
        except ValueError as e:
            raise APIError(400, str(e), param="stop") from None

    def _max_tokens(self, max_tokens: int | None, prompt_len: int, prompt_param: str) -> int:
        engine = self.engine
        if max_tokens is None:  # as many as fit
            max_tokens = min(self.limit, engine.max_context - prompt_len)
            if max_tokens < 1:
                try:
                    engine.check_fits(prompt_len, 1)
                except ContextLengthError as e:
                    raise context_error(e, prompt_param) from None
        if max_tokens <= 0:
            raise APIError(
                400,
                "max_tokens must be at least 1 (a completion may ask for 0 with echo, to score "
                "its prompt)",
                param="max_tokens",
            )
        if max_tokens > self.limit:
            raise APIError(400, f"max_tokens must be at most {self.limit}", param="max_tokens")
        self._check_fits(prompt_len, max_tokens, prompt_param)
        return max_tokens

    def _check_fits(self, prompt_len: int, max_tokens: int, prompt_param: str) -> None:
        try:
            self.engine.check_fits(prompt_len, max_tokens)
        except ContextLengthError as e:
            raise context_error(e, prompt_param) from None

    def _check_experts(self, top_k: int | None) -> None:
        if top_k is None:
            return
        if not self.cfg.moe:
            raise APIError(400, "moekit.top_k: this model has no experts", param="moekit.top_k")
        if top_k > self.engine.max_top_k:
            raise APIError(
                400,
                f"moekit.top_k must be at most {self.engine.max_top_k} for this model",
                param="moekit.top_k",
            )

    def replay(self, jobs: list[Job], opts: MoekitOptions) -> None:
        """Give `jobs` (one request's choices) the routing replay `opts` asks for: an
        APIError naming the problem when the routing does not fit the model or the request."""
        if not jobs:
            return
        prompts = [job.ids for job in jobs]
        max_new, only = jobs[0].params.max_new_tokens, jobs[0].prompt_only
        forced = replay.requested(opts, self.cfg, self.engine.max_top_k, prompts, max_new, only)
        for job in jobs:
            job.routed_experts, job.return_routed_experts = forced, opts.return_routed_experts

    def submit(self, jobs: list[Job], prompt_param: str) -> list[Submitted]:
        """Queue every job at once (all or none), each with the stream its events arrive on.
        Must be called on the event loop that will read the streams."""
        loop = asyncio.get_running_loop()
        out = []
        for job in jobs:
            stream = EventStream(loop)
            request = EngineRequest(
                job.ids,
                job.params,
                stream.emit,
                job.logprobs,
                job.echo_logprobs,
                job.prompt_only,
                grammar=job.grammar,
            )
            request.routed_experts = job.routed_experts
            request.return_routed_experts = job.return_routed_experts
            out.append((request, stream))
        try:
            self.engine.submit(*(r for r, _ in out))
        except QueueFullError as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from None
        except RequestTooLargeError as e:
            raise APIError(400, str(e), param="n", code="request_too_large") from None
        except ContextLengthError as e:
            raise context_error(e, prompt_param) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return out
