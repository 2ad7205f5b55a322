"""Streaming answers as server-sent events, exactly as the OpenAI clients read them: one
`data: {chunk}` event per piece of text, an error object in place of the last chunk of a
choice that failed or was aborted, and `data: [DONE]` at the end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from moekit.infer.detokenize import TokenBytes
from moekit.serve.errors import ended_badly
from moekit.serve.events import DoneEvent, PromptEvent, TokenEvent
from moekit.serve.protocol import ChatRequest, CompletionRequest, MoekitOptions
from moekit.serve.responses import (
    Echo,
    add_routed_experts,
    chat_logprob,
    prompt_entries,
    routing_json,
    token_entries,
    usage,
)
from moekit.serve.streams import Submitted, merged
from moekit.serve.tools import ToolPlan

DONE = b"data: [DONE]\n\n"


def event(data: Any) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data)}\n\n".encode()


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    """The response that sends `events` as they come."""
    return StreamingResponse(events, media_type="text/event-stream")


def _finish(done: DoneEvent, chunk: dict[str, Any], opts: MoekitOptions | None = None) -> bytes:
    """A choice's last event: its final chunk (with the choice's recorded routing, when
    `opts` asks for it), or the error it ended with."""
    problem = ended_badly(done)
    if opts is not None and problem is None:
        add_routed_experts(chunk["choices"][0], done, opts)
    return event(problem.body() if problem else chunk)


def _with_routing(data: dict[str, Any], token: TokenEvent, wanted: bool) -> dict[str, Any]:
    if wanted and token.routing is not None:
        data["choices"][0]["moekit"] = {"routing": [routing_json(token)]}
    return data


async def completion_events(
    request: Request,
    streams: list[Submitted],
    head: dict[str, Any],
    echoes: list[Echo],
    req: CompletionRequest,
) -> AsyncIterator[bytes]:
    """A streamed completion: choice i's chunks from `streams[i]`, echoing `echoes[i]`."""

    def chunk(i: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

    completion_tokens = 0
    cached_tokens = 0
    # With logprobs the echo waits for the prompt's logprobs (computed at prefill).
    echo_logprobs = req.echo and req.logprobs is not None
    if req.echo and not echo_logprobs:
        for i, echo in enumerate(echoes):
            yield event(chunk(i, echo.text))
    offset = [len(echo.text) for echo in echoes]  # of the next text, in the choice's text
    async for i, ev in merged(request, streams):
        if isinstance(ev, PromptEvent):
            if echo_logprobs:
                yield event(chunk(i, echoes[i].text, prompt_entries(echoes[i], ev.logprobs, req)))
            continue
        if isinstance(ev, DoneEvent):
            completion_tokens += ev.completion_tokens
            cached_tokens += ev.cached_tokens
            yield _finish(ev, chunk(i, "", None, ev.finish_reason), req.moekit)
            continue
        logprobs = None
        if req.logprobs is not None and ev.logprob is not None:
            logprobs = token_entries(ev.logprob, offset[i], req)
        offset[i] += len(ev.text)
        yield event(_with_routing(chunk(i, ev.text, logprobs), ev, req.moekit.routing))
    if req.stream_options and req.stream_options.include_usage:
        prompt_tokens = sum(len(r.prompt_ids) for r, _ in streams)
        totals = usage(prompt_tokens, completion_tokens, cached_tokens)
        yield event({**head, "choices": [], "usage": totals})
    yield DONE


async def chat_events(
    request: Request,
    streams: list[Submitted],
    head: dict[str, Any],
    req: ChatRequest,
    prompt_len: int,
    token_bytes: TokenBytes,
    tools: ToolPlan,
) -> AsyncIterator[bytes]:
    """A streamed chat answer: a first chunk with the role for every choice, then choice i's
    deltas from `streams[i]`; tool calls, read under `tools`, come as `delta.tool_calls` in
    a chunk of their own before the choice's last one."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(
        i: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

    completion_tokens = 0
    readers = [tools.reader() for _ in streams]
    cached_tokens = 0
    for i in range(len(streams)):
        yield event(chunk(i, {"role": "assistant", "content": ""}))
    async for i, ev in merged(request, streams):
        if isinstance(ev, PromptEvent):
            continue
        if isinstance(ev, DoneEvent):
            completion_tokens += ev.completion_tokens
            cached_tokens += ev.cached_tokens
            reason = ev.finish_reason
            if ended_badly(ev) is None:
                text, calls = readers[i].finish()
                if text:
                    yield event(chunk(i, {"content": text}))
                if calls:
                    listed = [c.to_openai(index=j) for j, c in enumerate(calls)]
                    yield event(chunk(i, {"tool_calls": listed}))
                    reason = "tool_calls" if reason == "stop" else reason
            yield _finish(ev, chunk(i, {}, None, reason), req.moekit)
            continue
        logprobs = None
        if req.logprobs and ev.logprob is not None:
            logprobs = {"content": [chat_logprob(ev.logprob, token_bytes)]}
        delta = {"content": readers[i].feed(ev.text)}
        yield event(_with_routing(chunk(i, delta, logprobs), ev, req.moekit.routing))
    if req.stream_options and req.stream_options.include_usage:
        prompt_tokens = prompt_len * len(streams)
        totals = usage(prompt_tokens, completion_tokens, cached_tokens)
        yield event({**head, "choices": [], "usage": totals})
    yield DONE
