"""`moekit serve`: an OpenAI-compatible HTTP API and a playground page that shows the experts.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events ending with `data: [DONE]`), GET /health, GET /metrics (Prometheus text),
GET / (the playground, with its files under /static/) and GET /v1/moekit/info (what the page
needs to know about the model).

With an API key set, every endpoint but /health requires it: as `Authorization: Bearer KEY`,
or, for the playground in a browser, by opening `/?key=KEY` once: that sets an HttpOnly
cookie (a digest of the key, not the key) that lets the browser load the page's files, and the
page sends the key as a Bearer token on its API calls.

A client that disconnects stops its generation: every choice of its request is cancelled
within a fraction of a second, streaming or not.

This module needs FastAPI and uvicorn (`pip install 'moekit[serve]'`); nothing else in moekit
imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import hmac
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from moekit.infer.chat import ChatTemplate
from moekit.infer.detokenize import TokenBytes, decode_with_offsets
from moekit.infer.generate import ContextLengthError, Generator
from moekit.infer.sampling import SamplingParams
from moekit.params import count_params
from moekit.serve.engine import (
    DoneEvent,
    Engine,
    EngineRequest,
    EngineStoppedError,
    Event,
    PromptEvent,
    QueueFullError,
    RequestTooLargeError,
    TokenEvent,
    TokenLogprob,
    new_id,
)
from moekit.serve.protocol import APIError, ChatRequest, CompletionRequest, parse

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.2  # how often a request checks whether its client is still there
PAGE_COOKIE = "moekit_page"
# Metrics are labelled by endpoint; any other path under /v1/ counts as "other", so that
# clients probing random paths cannot grow the label set without bound.
API_ENDPOINTS = frozenset(
    {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/moekit/info"}
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int | None = None  # None: the engine's max_context
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after_s: int = 1


@dataclass
class _Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, int] = field(default_factory=dict)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds
        self.latency_count[endpoint] = self.latency_count.get(endpoint, 0) + 1


class _Stream:
    """Engine events for one request, handed across threads into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def page_token(api_key: str) -> str:
    """The playground cookie's value: proves the browser was given the key without being the
    key (a leaked cookie does not open the API)."""
    return hmac.new(api_key.encode(), b"moekit playground", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


class _Guard:
    """ASGI middleware in front of every request: the API key, the body-size limit, and the
    request and latency metrics (to the first byte of the body: the whole answer when not
    streaming, the first event when streaming). Plain ASGI, so that the endpoints see the real
    `receive` channel and can notice a client that went away."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig, metrics: _Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        path: str = scope["path"]
        status, started, first_byte = 500, False, None

        async def watched(message: Message) -> None:
            nonlocal status, started, first_byte
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif message["type"] == "http.response.body" and first_byte is None:
                first_byte = time.monotonic()
            await send(message)

        try:
            problem = self._check(Request(scope))
            if problem is not None:
                await _error_response(problem)(scope, receive, watched)
            else:
                await self.app(scope, receive, watched)
        except Exception as exc:  # a bug must cost one request, not the server
            if started:  # too late for an error response
                raise
            err = APIError(500, f"internal error: {exc}", type="server_error")
            await _error_response(err)(scope, receive, watched)
        finally:
            if path.startswith("/v1/"):
                endpoint = path if path in API_ENDPOINTS else "other"
                self.metrics.observe(endpoint, status, (first_byte or time.monotonic()) - t0)

    def _check(self, request: Request) -> APIError | None:
        key, path = self.config.api_key, request.url.path
        if key and path != "/health" and not _authorized(request, key):
            return APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' "
                "(in a browser, open /?key=<key>)",
                type="authentication_error",
                code="invalid_api_key",
            )
        size = request.headers.get("content-length")
        limit = self.config.max_body_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            return APIError(413, f"the request body is larger than {limit} bytes")
        return None


def _authorized(request: Request, key: str) -> bool:
    """The Bearer key anywhere; for the playground also `/?key=KEY`, and the cookie that sets
    for the page and its files."""
    path = request.url.path
    if _same(request.headers.get("authorization", ""), f"Bearer {key}"):
        return True
    if path == "/" and _same(request.query_params.get("key", ""), key):
        return True
    page = path == "/" or path.startswith("/static/")
    return page and _same(request.cookies.get(PAGE_COOKIE, ""), page_token(key))


def _error_response(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@dataclass
class _Echo:
    """A prompt as a completion echoes it: its text, ids, and each id's offset in the text."""

    text: str
    ids: list[int]
    offsets: list[int]


def create_app(
    engine: Engine, config: ServerConfig, template: ChatTemplate | None = None
) -> FastAPI:
    """The FastAPI application serving `engine`'s model under `config.model_name`."""
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics()
    template = template or ChatTemplate()
    tokenizer, cfg = engine.tokenizer, engine.cfg
    token_bytes = TokenBytes(tokenizer)
    limit = config.max_tokens_limit or engine.max_context
    started = time.time()
    app.add_middleware(_Guard, config=config, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        return _error_response(APIError(500, f"internal error: {exc}", type="server_error"))

    async def body_json(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise APIError(
                    413, f"the request body is larger than {config.max_body_bytes} bytes"
                )
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_size(generations: int, n: int) -> None:
        """A request is queued whole: one bigger than the queue could never start."""
        if generations > engine.max_queue:
            raise APIError(
                400,
                f"this request asks for {generations} generations (prompts x n) but the server "
                f"queues at most {engine.max_queue} at once (--max-queue); send fewer prompts "
                "or a smaller n",
                param="n" if n > 1 else "prompt",
                code="request_too_large",
            )

    def context_error(e: ContextLengthError, param: str) -> APIError:
        return APIError(400, str(e), param=param, code="context_length_exceeded")

    def sampling(
        req: Any, max_tokens: int | None, prompt_len: int, prompt_param: str
    ) -> SamplingParams:
        if max_tokens is None:  # as many as fit
            max_tokens = min(limit, engine.max_context - prompt_len)
            if max_tokens < 1:
                try:
                    engine.check_fits(prompt_len, 1)
                except ContextLengthError as e:
                    raise context_error(e, prompt_param) from None
        if max_tokens <= 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        if max_tokens > limit:
            raise APIError(400, f"max_tokens must be at most {limit}", param="max_tokens")
        try:
            engine.check_fits(prompt_len, max_tokens)
        except ContextLengthError as e:
            raise context_error(e, prompt_param) from None
        if req.moekit.top_k is not None:
            if not cfg.moe:
                raise APIError(400, "moekit.top_k: this model has no experts", param="moekit.top_k")
            if req.moekit.top_k > engine.max_top_k:
                raise APIError(
                    400,
                    f"moekit.top_k must be at most {engine.max_top_k} for this model",
                    param="moekit.top_k",
                )
        if any(not 0 <= t < cfg.vocab_size for t in req.stop_token_ids):
            raise APIError(
                400, f"stop_token_ids must be in [0, {cfg.vocab_size})", param="stop_token_ids"
            )
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                experts_per_token=req.moekit.top_k,
                return_routing=req.moekit.routing,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def encode(prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            ids: list[int] = tokenizer.encode_prompt(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < cfg.vocab_size for t in ids):
                raise APIError(
                    400, f"prompt token ids must be in [0, {cfg.vocab_size})", param=param
                )
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return ids

    def submit(
        jobs: list[tuple[list[int], SamplingParams, int | None, bool]], prompt_param: str
    ) -> list[tuple[EngineRequest, _Stream]]:
        loop = asyncio.get_running_loop()
        out = []
        for ids, params, logprobs, echo in jobs:
            stream = _Stream(loop)
            out.append((EngineRequest(ids, params, stream.emit, logprobs, echo), stream))
        try:
            engine.submit(*(r for r, _ in out))
        except QueueFullError as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(config.retry_after_s)},
            ) from None
        except RequestTooLargeError as e:
            raise APIError(400, str(e), param="n", code="request_too_large") from None
        except ContextLengthError as e:
            raise context_error(e, prompt_param) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return out

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # ---- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queue_depth": engine.queue_depth}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": int(started),
                    "owned_by": "moekit",
                    "max_model_len": engine.max_context,
                }
            ],
        }

    @app.get("/v1/moekit/info")
    async def info() -> dict[str, Any]:
        moe = cfg.moe
        return {
            "model": config.model_name,
            "max_seq_len": cfg.max_seq_len,
            "max_context": engine.max_context,
            "num_layers": cfg.num_layers,
            "moe_layers": cfg.moe_layers,
            "num_experts": moe.num_experts if moe else 0,
            "top_k": engine.default_top_k,
            "max_top_k": engine.max_top_k,
            "total_params": count_params(cfg).total,
            "active_params": count_params(cfg).active,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(
            _prometheus(engine, metrics), media_type="text/plain; version=0.0.4"
        )

    @app.get("/")
    async def page(request: Request) -> Response:
        response = HTMLResponse(_static("index.html").decode())
        key = config.api_key
        if key and _same(request.query_params.get("key", ""), key):
            # Lets the browser fetch the page's files; the page itself sends the key (which it
            # reads from its URL) as a Bearer token on its API calls.
            response.set_cookie(
                PAGE_COOKIE, page_token(key), httponly=True, samesite="strict", path="/"
            )
        return response

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        suffix = Path(name).suffix
        if "/" in name or suffix not in types:
            raise APIError(404, f"no static file {name!r}", type="not_found_error")
        try:
            data = _static(name)
        except FileNotFoundError:
            raise APIError(404, f"no static file {name!r}", type="not_found_error") from None
        return Response(data, media_type=types[suffix])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = parse(CompletionRequest, await body_json(request))
        check_model(req.model)
        prompts = _prompt_list(req.prompt)
        check_size(len(prompts) * req.n, req.n)
        encoded = [encode(p, "prompt") for p in prompts]
        jobs = []
        for ids in encoded:
            params = sampling(req, req.max_tokens, len(ids), "prompt")
            for i in range(req.n):
                echo_logprobs = req.echo and req.logprobs is not None
                jobs.append((ids, _with_seed(params, req.seed, i), req.logprobs, echo_logprobs))
        streams = submit(jobs, "prompt")
        rid, created = new_id("cmpl"), int(time.time())
        head = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": config.model_name,
        }
        echoes = []
        for ids in encoded:
            echo = _Echo("", ids, [])
            if req.echo:
                echo.text, echo.offsets = decode_with_offsets(tokenizer, ids)
            echoes += [echo] * req.n
        if req.stream:
            return StreamingResponse(
                _sse_completions(request, streams, head, echoes, req, usage),
                media_type="text/event-stream",
            )
        results = await _collect_all(request, streams)
        choices = []
        for index, result in enumerate(results):
            echo = echoes[index]
            choice: dict[str, Any] = {
                "index": index,
                "text": echo.text + result.done.text,
                "logprobs": _completion_logprobs(result, req, echo)
                if req.logprobs is not None
                else None,
                "finish_reason": result.done.finish_reason,
            }
            if req.moekit.routing:
                choice["moekit"] = {"routing": result.routing}
            choices.append(choice)
        prompt_tokens = sum(len(ids) for ids in encoded) * req.n
        completion_tokens = sum(r.done.completion_tokens for r in results)
        return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req: ChatRequest = parse(ChatRequest, await body_json(request))
        check_model(req.model)
        check_size(req.n, req.n)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        try:
            prompt = template.format(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = encode(prompt, "messages")
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        params = sampling(req, max_tokens, len(ids), "messages")
        try:
            params = dataclasses.replace(params, stop=[*params.stop, *template.stop])
        except ValueError as e:
            raise APIError(400, str(e), param="stop") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(ids, _with_seed(params, req.seed, i), top, False) for i in range(req.n)]
        streams = submit(jobs, "messages")
        rid, created = new_id("chatcmpl"), int(time.time())
        head = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": config.model_name,
        }
        if req.stream:
            return StreamingResponse(
                _sse_chat(request, streams, head, req, usage, len(ids), token_bytes),
                media_type="text/event-stream",
            )
        results = await _collect_all(request, streams)
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": result.done.text},
                "logprobs": {
                    "content": [
                        _chat_logprob(t.logprob, token_bytes) for t in result.tokens if t.logprob
                    ]
                }
                if req.logprobs
                else None,
                "finish_reason": result.done.finish_reason,
            }
            if req.moekit.routing:
                choice["moekit"] = {"routing": result.routing}
            choices.append(choice)
        completion_tokens = sum(r.done.completion_tokens for r in results)
        return {**head, "choices": choices, "usage": usage(len(ids) * req.n, completion_tokens)}

    return app


# ---- helpers -------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return resources.files("moekit.serve").joinpath("static", name).read_bytes()


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def _with_seed(params: SamplingParams, seed: int | None, choice: int) -> SamplingParams:
    """Choice i of a seeded request samples with seed + i (reproducible, yet different)."""
    return params if seed is None else dataclasses.replace(params, seed=seed + choice)


def _routing_json(event: TokenEvent) -> dict[str, Any]:
    return {
        "token_id": event.id,
        "text": event.text,
        "layers": {str(k): [[e, w] for e, w in v] for k, v in (event.routing or {}).items()},
    }


@dataclass
class _Result:
    done: DoneEvent
    tokens: list[TokenEvent]
    prompt_logprobs: list[TokenLogprob | None]

    @property
    def routing(self) -> list[dict[str, Any]]:
        return [_routing_json(t) for t in self.tokens if t.routing is not None]


async def _cancel_on_disconnect(request: Request, reqs: list[EngineRequest]) -> None:
    """Cancel `reqs` as soon as the client goes away (polled: nothing tells us otherwise)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    for r in reqs:
        r.cancelled.set()


def _ended_badly(done: DoneEvent) -> APIError | None:
    if done.finish_reason == "error":
        return APIError(500, done.error or "generation failed", type="server_error")
    if done.finish_reason == "abort":
        return APIError(503, done.error or "aborted", type="server_error", code="shutting_down")
    return None


async def _collect_all(
    request: Request, streams: list[tuple[EngineRequest, _Stream]]
) -> list[_Result]:
    """Every choice's events until it is done, while watching the client: if it leaves, every
    choice is cancelled; if one choice fails, the others are too."""
    reqs = [r for r, _ in streams]
    watcher = asyncio.create_task(_cancel_on_disconnect(request, reqs))
    try:
        return [await _collect(stream) for _, stream in streams]
    finally:
        watcher.cancel()
        for r in reqs:
            r.cancelled.set()  # a no-op for finished ones


async def _collect(stream: _Stream) -> _Result:
    tokens: list[TokenEvent] = []
    prompt: list[TokenLogprob | None] = []
    while True:
        event = await stream.queue.get()
        if isinstance(event, DoneEvent):
            problem = _ended_badly(event)
            if problem is not None:
                raise problem
            return _Result(event, tokens, prompt)
        if isinstance(event, PromptEvent):
            prompt = event.logprobs
        else:
            tokens.append(event)


def _top_dict(lp: TokenLogprob | None, wanted: bool) -> dict[str, float] | None:
    return {alt.token: alt.logprob for alt in lp.top} if lp is not None and wanted else None


def _prompt_entries(
    echo: _Echo, logprobs: list[TokenLogprob | None], req: CompletionRequest
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
        "top_logprobs": [_top_dict(lp, bool(req.logprobs)) for lp in logprobs],
        "text_offset": list(echo.offsets),
    }


def _completion_logprobs(
    result: _Result, req: CompletionRequest, echo: _Echo
) -> dict[str, list[Any]]:
    """OpenAI's completion logprobs: `text_offset` is where each token's text starts in the
    choice's `text` (the echoed prompt included)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}  # fmt: skip
    if req.echo:
        out = _prompt_entries(echo, result.prompt_logprobs, req)
    pos = len(echo.text)
    for t in result.tokens:
        if t.logprob is not None:
            out["tokens"].append(t.logprob.token)
            out["token_logprobs"].append(t.logprob.logprob)
            out["top_logprobs"].append(_top_dict(t.logprob, bool(req.logprobs)))
            out["text_offset"].append(pos)
        pos += len(t.text)
    return out


def _chat_logprob(lp: TokenLogprob, token_bytes: TokenBytes) -> dict[str, Any]:
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


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _sse_error(err: APIError) -> bytes:
    return _sse(err.body())


async def _merged(
    request: Request, streams: list[tuple[EngineRequest, _Stream]]
) -> AsyncIterator[tuple[int, Event]]:
    """Events of several requests as they come, tagged with the request's index; a client
    that leaves (noticed by polling, or by the failed write that ends this generator) stops
    every one of them."""
    reqs = [r for r, _ in streams]
    watcher = asyncio.create_task(_cancel_on_disconnect(request, reqs))
    pending = {i: asyncio.ensure_future(s.queue.get()) for i, (_, s) in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i, fut in list(pending.items()):
                if fut in done:
                    event = fut.result()
                    yield i, event
                    if isinstance(event, DoneEvent):
                        del pending[i]
                    else:
                        pending[i] = asyncio.ensure_future(streams[i][1].queue.get())
    finally:
        watcher.cancel()
        for fut in pending.values():
            fut.cancel()
        for r in reqs:
            r.cancelled.set()


async def _sse_completions(
    request: Request,
    streams: list[tuple[EngineRequest, _Stream]],
    head: dict[str, Any],
    echoes: list[_Echo],
    req: CompletionRequest,
    usage: Callable[[int, int], dict[str, int]],
) -> AsyncIterator[bytes]:
    def chunk(i: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

    completion_tokens = 0
    # With logprobs the echo waits for the prompt's logprobs (computed at prefill).
    echo_logprobs = req.echo and req.logprobs is not None
    if req.echo and not echo_logprobs:
        for i, echo in enumerate(echoes):
            yield _sse(chunk(i, echo.text))
    offset = [len(echo.text) for echo in echoes]  # of the next text, in the choice's text
    async for i, event in _merged(request, streams):
        if isinstance(event, PromptEvent):
            if echo_logprobs:
                entries = _prompt_entries(echoes[i], event.logprobs, req)
                yield _sse(chunk(i, echoes[i].text, entries))
            continue
        if isinstance(event, DoneEvent):
            completion_tokens += event.completion_tokens
            problem = _ended_badly(event)
            yield _sse_error(problem) if problem else _sse(chunk(i, "", None, event.finish_reason))
            continue
        logprobs = None
        if req.logprobs is not None and event.logprob is not None:
            logprobs = {
                "tokens": [event.logprob.token],
                "token_logprobs": [event.logprob.logprob],
                "top_logprobs": [_top_dict(event.logprob, bool(req.logprobs))],
                "text_offset": [offset[i]],
            }
        offset[i] += len(event.text)
        data = chunk(i, event.text, logprobs)
        if req.moekit.routing and event.routing is not None:
            data["choices"][0]["moekit"] = {"routing": [_routing_json(event)]}
        yield _sse(data)
    if req.stream_options and req.stream_options.include_usage:
        prompt_tokens = sum(len(r.prompt_ids) for r, _ in streams)
        yield _sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield b"data: [DONE]\n\n"


async def _sse_chat(
    request: Request,
    streams: list[tuple[EngineRequest, _Stream]],
    head: dict[str, Any],
    req: ChatRequest,
    usage: Callable[[int, int], dict[str, int]],
    prompt_len: int,
    token_bytes: TokenBytes,
) -> AsyncIterator[bytes]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(
        i: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

    completion_tokens = 0
    for i in range(len(streams)):
        yield _sse(chunk(i, {"role": "assistant", "content": ""}))
    async for i, event in _merged(request, streams):
        if isinstance(event, PromptEvent):
            continue
        if isinstance(event, DoneEvent):
            completion_tokens += event.completion_tokens
            problem = _ended_badly(event)
            yield _sse_error(problem) if problem else _sse(chunk(i, {}, None, event.finish_reason))
            continue
        logprobs = None
        if req.logprobs and event.logprob is not None:
            logprobs = {"content": [_chat_logprob(event.logprob, token_bytes)]}
        data = chunk(i, {"content": event.text}, logprobs)
        if req.moekit.routing and event.routing is not None:
            data["choices"][0]["moekit"] = {"routing": [_routing_json(event)]}
        yield _sse(data)
    if req.stream_options and req.stream_options.include_usage:
        yield _sse(
            {**head, "choices": [], "usage": usage(prompt_len * len(streams), completion_tokens)}
        )
    yield b"data: [DONE]\n\n"


def _prometheus(engine: Engine, metrics: _Metrics) -> str:
    lines = [
        "# HELP moekit_requests_total HTTP requests to the API, by endpoint and status.",
        "# TYPE moekit_requests_total counter",
    ]
    for (endpoint, status), n in sorted(metrics.requests.items()):
        lines.append(f'moekit_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines += [
        "# HELP moekit_request_latency_seconds Time to answer an API request (to the last byte "
        "for non-streaming, to the first for streaming).",
        "# TYPE moekit_request_latency_seconds summary",
    ]
    for endpoint in sorted(metrics.latency_count):
        label = f'{{endpoint="{endpoint}"}}'
        lines.append(
            f"moekit_request_latency_seconds_sum{label} {metrics.latency_sum[endpoint]:.6f}"
        )
        lines.append(
            f"moekit_request_latency_seconds_count{label} {metrics.latency_count[endpoint]}"
        )
    s = engine.stats
    lines += [
        "# HELP moekit_prompt_tokens_total Prompt tokens prefilled.",
        "# TYPE moekit_prompt_tokens_total counter",
        f"moekit_prompt_tokens_total {s.prompt_tokens}",
        "# HELP moekit_generated_tokens_total Tokens generated.",
        "# TYPE moekit_generated_tokens_total counter",
        f"moekit_generated_tokens_total {s.generated_tokens}",
        "# HELP moekit_finished_requests_total Generations finished, by reason.",
        "# TYPE moekit_finished_requests_total counter",
        *(
            f'moekit_finished_requests_total{{reason="{r}"}} {n}'
            for r, n in sorted(s.finished.items())
        ),
        "# HELP moekit_queue_depth Requests waiting for a batch slot.",
        "# TYPE moekit_queue_depth gauge",
        f"moekit_queue_depth {engine.queue_depth}",
        "# HELP moekit_active_requests Requests being generated.",
        "# TYPE moekit_active_requests gauge",
        f"moekit_active_requests {engine.active}",
        "# HELP moekit_decode_steps_total Batched decode steps.",
        "# TYPE moekit_decode_steps_total counter",
        f"moekit_decode_steps_total {s.decode_steps}",
        "# HELP moekit_decode_batch_tokens_total Tokens decoded over all steps (divide by steps "
        "for the mean batch size).",
        "# TYPE moekit_decode_batch_tokens_total counter",
        f"moekit_decode_batch_tokens_total {s.batched_tokens}",
        "# HELP moekit_expert_tokens_total Generated tokens routed to each expert, by MoE layer.",
        "# TYPE moekit_expert_tokens_total counter",
    ]
    for layer, counts in sorted(s.expert_tokens.items()):
        for e, n in enumerate(counts):
            lines.append(f'moekit_expert_tokens_total{{layer="{layer}",expert="{e}"}} {n}')
    return "\n".join(lines) + "\n"


# ---- running it --------------------------------------------------------------------------


class PortInUseError(ValueError):
    """The address `moekit serve` was asked to listen on is taken. A ValueError, so that the
    command line reports it as a usage error (exit code 2) rather than a crash."""


def build(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    max_context: int | None = None,
    device: str | None = "auto",
) -> tuple[FastAPI, Engine]:
    """Load a model directory and return (app, engine); start the engine before serving.
    `max_context` bounds prompt plus new tokens per request and sizes the KV cache (default:
    the model's max_seq_len, at most 4096)."""
    generator = Generator.from_dir(model_dir, device=device)
    engine = Engine(generator, max_batch=max_batch, max_queue=max_queue, max_context=max_context)
    config = ServerConfig(
        model_name=model_name or Path(model_dir).resolve().name,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
    )
    return create_app(engine, config, ChatTemplate.load(model_dir)), engine


def _listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a clear error when that address is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot serve on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restart must not wait for the old connections' TIME_WAIT to expire.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is in use; stop whatever listens there or choose "
                "another port with --port"
            ) from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    max_context: int | None = None,
    device: str | None = "auto",
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve a model directory over HTTP until interrupted (an OpenAI-compatible API at
    http://HOST:PORT/v1 and a playground page at http://HOST:PORT/). `max_context` bounds
    prompt plus new tokens per request and sizes each batch slot's KV cache (default: the
    model's max_seq_len, at most 4096). The model runs on `device` ("auto": CUDA when present,
    else the CPU). `on_ready` is called once the server accepts requests. Raises PortInUseError
    when the port is taken."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError(
            "moekit serve needs FastAPI and uvicorn: pip install 'moekit[serve]'"
        ) from None
    sock = _listen_socket(host, port)  # before loading the model: fail fast
    try:
        app, engine = build(
            model_dir,
            api_key=api_key,
            model_name=model_name,
            max_batch=max_batch,
            max_queue=max_queue,
            max_tokens_limit=max_tokens_limit,
            max_context=max_context,
            device=device,
        )
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    http = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="moekit-http", daemon=True
    )
    http.start()
    while not server.started:  # the engine runs only once the server does
        http.join(timeout=0.05)
        if not http.is_alive():
            sock.close()
            raise RuntimeError(f"the HTTP server on {host}:{port} failed to start")
    if on_ready is not None:
        on_ready()

    def stop_engine_when_http_ends() -> None:
        http.join()
        engine.stop()

    threading.Thread(target=stop_engine_when_http_ends, name="moekit-watch", daemon=True).start()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)  # stop as gracefully as Ctrl-C
    try:
        engine.run()  # the heavy work stays in the main thread (see Engine.run)
    except KeyboardInterrupt:
        pass
    finally:  # the engine has answered every request ("abort"); let the server send them
        server.should_exit = True
        http.join(timeout=10)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
