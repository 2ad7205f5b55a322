"""OpenAI response bodies, built from what the engine sent: completion and chat answers,
their usage, logprobs and the `moekit.routing` extension. Streaming chunks reuse these
pieces (sse.py)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from moekit.infer.detokenize import TokenBytes, decode_with_offsets
from moekit.serve.events import DoneEvent, TokenEvent, TokenLogprob
from moekit.serve.protocol import ChatRequest, CompletionRequest, MoekitOptions
from moekit.serve.streams import Generation
from moekit.serve.tools import ToolPlan

_ids = itertools.count()


def new_id(prefix: str) -> str:
    """A response id unique within this process, e.g. "cmpl-1700000000000042"."""
    return f"{prefix}-{int(time.time())}{next(_ids):06d}"


def head(prefix: str, kind: str, model: str) -> dict[str, Any]:
    """The fields every body and chunk of one response shares: id, object, created, model."""
    return {"id": new_id(prefix), "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens`: prompt tokens taken from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def routing_json(event: TokenEvent) -> dict[str, Any]:
    """One token's experts and weights per MoE layer, as `moekit.routing` lists them."""
    return {
        "token_id": event.id,
        "text": event.text,
        "layers": {str(k): [[e, w] for e, w in v] for k, v in (event.routing or {}).items()},
    }


def routing_list(tokens: list[TokenEvent]) -> list[dict[str, Any]]:
    return [routing_json(t) for t in tokens if t.routing is not None]


def add_routed_experts(choice: dict[str, Any], done: DoneEvent, opts: MoekitOptions) -> None:
    """With `return_routed_experts`, put the choice's recorded routing (every token the model
    read, compact: see moekit.serve.replay) in `choice["moekit"]["routed_experts"]`."""
    if opts.return_routed_experts:
        choice.setdefault("moekit", {})["routed_experts"] = done.routed_experts


@dataclass
class Echo:
    """A prompt as a completion echoes it: its text, ids, and each id's offset in the text
    (empty text and offsets when the request does not echo)."""

    text: str
    ids: list[int]
    offsets: list[int]


def echoes(tokenizer: Any, prompts: list[list[int]], req: CompletionRequest) -> list[Echo]:
    """The echo of each choice (`req.n` per prompt, prompts given as ids): the prompt's text
    and offsets when the request echoes, else empty text."""
    out = []
    for ids in prompts:
        echo = Echo("", ids, [])
        if req.echo:
            echo.text, echo.offsets = decode_with_offsets(tokenizer, ids)
        out += [echo] * req.n
    return out


def top_dict(lp: TokenLogprob | None, wanted: bool) -> dict[str, float] | None:
    return {alt.token: alt.logprob for alt in lp.top} if lp is not None and wanted else None


def prompt_entries(
    echo: Echo, logprobs: list[TokenLogprob | None], req: CompletionRequest
) -> dict[str, list[Any]]:
    """The echoed prompt's part of a completion's logprobs (the first token has none)."""
    logprobs = logprobs or [None] * len(echo.ids)
    ends = [*echo.offsets[1:], len(echo.text)]
    return {
        "tokens": [
            lp.token if lp else echo.text[start:end]
            for lp, start, end in zip(logprobs, echo.offsets, ends, strict=True)
        ],
        "token_logprobs": [lp.logprob if lp else None for lp in logprobs],
        "top_logprobs": [top_dict(lp, bool(req.logprobs)) for lp in logprobs],
        "text_offset": list(echo.offsets),
    }


def token_entries(lp: TokenLogprob, offset: int, req: CompletionRequest) -> dict[str, list[Any]]:
    """One generated token's part of a completion's logprobs; it starts at `offset` in the
    choice's text."""
    return {
        "tokens": [lp.token],
        "token_logprobs": [lp.logprob],
        "top_logprobs": [top_dict(lp, bool(req.logprobs))],
        "text_offset": [offset],
    }


def completion_logprobs(
    gen: Generation, req: CompletionRequest, echo: Echo
) -> dict[str, list[Any]]:
    """OpenAI's completion logprobs: `text_offset` is where each token's text starts in the
    choice's `text` (the echoed prompt included)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}  # fmt: skip
    if req.echo:
        out = prompt_entries(echo, gen.prompt_logprobs, req)
    pos = len(echo.text)
    for t in gen.tokens:
        if t.logprob is not None:
            for key, values in token_entries(t.logprob, pos, req).items():
                out[key] += values
        pos += len(t.text)
    return out


def chat_logprob(lp: TokenLogprob, token_bytes: TokenBytes) -> dict[str, Any]:
    """One token's entry in a chat answer's `logprobs.content`, with its UTF-8 `bytes`."""

    def as_list(token_id: int) -> list[int] | None:
        raw = token_bytes(token_id)
        return list(raw) if raw is not None else None

    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": as_list(lp.id),
        "top_logprobs": [
            {"token": alt.token, "logprob": alt.logprob, "bytes": as_list(alt.id)} for alt in lp.top
        ],
    }


def completion_body(
    head: dict[str, Any],
    gens: list[Generation],
    echoes: list[Echo],
    req: CompletionRequest,
    prompt_tokens: int,
) -> dict[str, Any]:
    """The whole answer to a non-streaming completion request, choice i from `gens[i]`."""
    choices = []
    for index, (gen, echo) in enumerate(zip(gens, echoes, strict=True)):
        choice: dict[str, Any] = {
            "index": index,
            "text": echo.text + gen.done.text,
            "logprobs": completion_logprobs(gen, req, echo) if req.logprobs is not None else None,
            "finish_reason": gen.done.finish_reason,
        }
        if req.moekit.routing:
            choice["moekit"] = {"routing": routing_list(gen.tokens)}
        add_routed_experts(choice, gen.done, req.moekit)
        choices.append(choice)
    completion_tokens = sum(g.done.completion_tokens for g in gens)
    cached = sum(g.done.cached_tokens for g in gens)
    return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)}


def chat_message(text: str, finish_reason: str, tools: ToolPlan) -> tuple[dict[str, Any], str]:
    """A chat answer's message (its text, or its tool calls read from the text) and its
    finish reason ("tool_calls" when it ended by calling)."""
    content, calls = tools.read(text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return message, finish_reason


def chat_body(
    head: dict[str, Any],
    gens: list[Generation],
    req: ChatRequest,
    prompt_tokens: int,
    token_bytes: TokenBytes,
    tools: ToolPlan,
) -> dict[str, Any]:
    """The whole answer to a non-streaming chat request, choice i from `gens[i]`."""
    choices = []
    for index, gen in enumerate(gens):
        logprobs = None
        if req.logprobs:
            entries = [chat_logprob(t.logprob, token_bytes) for t in gen.tokens if t.logprob]
            logprobs = {"content": entries}
        message, finish_reason = chat_message(gen.done.text, gen.done.finish_reason, tools)
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        if req.moekit.routing:
            choice["moekit"] = {"routing": routing_list(gen.tokens)}
        add_routed_experts(choice, gen.done, req.moekit)
        choices.append(choice)
    completion_tokens = sum(g.done.completion_tokens for g in gens)
    cached = sum(g.done.cached_tokens for g in gens)
    return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)}
