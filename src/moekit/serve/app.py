"""`moekit serve`: an OpenAI-compatible HTTP API and a playground page that shows the experts.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events ending with `data: [DONE]`), GET /health, GET /metrics (Prometheus text),
GET / (the playground) and GET /v1/moekit/info (what the page needs to know about the model).
With an API key set, every endpoint but /health and the page's static files requires
`Authorization: Bearer KEY`.

This module needs FastAPI and uvicorn (`pip install 'moekit[serve]'`); nothing else in moekit
imports it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from moekit.infer.chat import ChatTemplate
from moekit.infer.generate import ContextLengthError, Generator, check_fits
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import (
    DoneEvent,
    Engine,
    EngineRequest,
    Event,
    PromptEvent,
    QueueFullError,
    TokenEvent,
    TokenLogprob,
    new_id,
)
from moekit.serve.protocol import APIError, ChatRequest, CompletionRequest, parse

MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int | None = None  # None: the model's context length
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


def create_app(
    engine: Engine, config: ServerConfig, template: ChatTemplate | None = None
) -> FastAPI:
    """The FastAPI application serving `engine`'s model under `config.model_name`."""
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics()
    template = template or ChatTemplate()
    tokenizer, cfg = engine.tokenizer, engine.cfg
    limit = config.max_tokens_limit or cfg.max_seq_len
    started = time.time()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        err = APIError(500, f"internal error: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        t0 = time.monotonic()
        path = request.url.path
        public = path in ("/health", "/") or path.startswith("/static/")
        try:
            authorized = request.headers.get("authorization") == f"Bearer {config.api_key}"
            if config.api_key and not public and not authorized:
                raise APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > config.max_body_bytes:
                raise APIError(
                    413, f"the request body is larger than {config.max_body_bytes} bytes"
                )
            response: Response = await call_next(request)
        except APIError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # a bug must cost one request, not the server
            err = APIError(500, f"internal error: {exc}", type="server_error")
            response = JSONResponse(err.body(), status_code=500)
        if path.startswith("/v1/"):
            metrics.observe(path, response.status_code, time.monotonic() - t0)
        return response

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

    def sampling(req: Any, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if max_tokens is None:
            max_tokens = min(limit, cfg.max_seq_len - prompt_len)
            if max_tokens < 1:
                try:
                    check_fits(prompt_len, 1, cfg.max_seq_len)
                except ContextLengthError as e:
                    raise APIError(
                        400, str(e), param="prompt", code="context_length_exceeded"
                    ) from None
        if max_tokens <= 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        if max_tokens > limit:
            raise APIError(400, f"max_tokens must be at most {limit}", param="max_tokens")
        if req.moekit.top_k is not None:
            if not cfg.moe:
                raise APIError(400, "moekit.top_k: this model has no experts", param="moekit.top_k")
            if req.moekit.top_k > engine.max_top_k:
                raise APIError(
                    400,
                    f"moekit.top_k must be at most {engine.max_top_k} for this model",
                    param="moekit.top_k",
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
                ignore_eos=req.ignore_eos,
                experts_per_token=req.moekit.top_k,
                return_routing=req.moekit.routing,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids: list[int] = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < cfg.vocab_size for t in ids):
                raise APIError(
                    400, f"prompt token ids must be in [0, {cfg.vocab_size})", param="prompt"
                )
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def submit(
        jobs: list[tuple[list[int], SamplingParams, int | None, bool]],
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
        except ContextLengthError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
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
                }
            ],
        }

    @app.get("/v1/moekit/info")
    async def info() -> dict[str, Any]:
        moe = cfg.moe
        return {
            "model": config.model_name,
            "max_seq_len": cfg.max_seq_len,
            "num_layers": cfg.num_layers,
            "moe_layers": cfg.moe_layers,
            "num_experts": moe.num_experts if moe else 0,
            "top_k": engine.default_top_k,
            "max_top_k": engine.max_top_k,
            "total_params": cfg.num_params(),
            "active_params": cfg.num_active_params(),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(
            _prometheus(engine, metrics), media_type="text/plain; version=0.0.4"
        )

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(_static("index.html").decode())

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
        encoded = [encode(p) for p in prompts]
        jobs = []
        for ids in encoded:
            params = sampling(req, req.max_tokens, len(ids))
            for i in range(req.n):
                p = params if req.seed is None else _with_seed(params, req.seed + i)
                jobs.append((ids, p, req.logprobs, req.echo and req.logprobs is not None))
        streams = submit(jobs)
        rid, created = new_id("cmpl"), int(time.time())
        head = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": config.model_name,
        }
        echo_texts = [
            tokenizer.decode(ids) if req.echo else "" for ids in encoded for _ in range(req.n)
        ]
        if req.stream:
            return StreamingResponse(
                _sse_completions(streams, head, echo_texts, req, usage),
                media_type="text/event-stream",
            )
        choices, completion_tokens = [], 0
        for index, (engine_req, stream) in enumerate(streams):
            result = await _collect(stream, request, engine_req)
            completion_tokens += result.done.completion_tokens
            choice: dict[str, Any] = {
                "index": index,
                "text": echo_texts[index] + result.done.text,
                "logprobs": _completion_logprobs(
                    result, req, echo_texts[index], engine_req.prompt_ids, tokenizer
                )
                if req.logprobs is not None
                else None,
                "finish_reason": result.done.finish_reason,
            }
            if req.moekit.routing:
                choice["moekit"] = {"routing": result.routing}
            choices.append(choice)
        prompt_tokens = sum(len(ids) for ids in encoded) * req.n
        return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req: ChatRequest = parse(ChatRequest, await body_json(request))
        check_model(req.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        try:
            prompt = template.format(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = encode(prompt)
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        try:
            params = sampling(req, max_tokens, len(ids))
        except APIError as e:
            if e.code == "context_length_exceeded":
                e.param = "messages"
            raise
        params = SamplingParams(**{**params.__dict__, "stop": [*params.stop, *template.stop]})
        top = req.top_logprobs if req.logprobs else None
        jobs = [
            (
                ids,
                params if req.seed is None else _with_seed(params, req.seed + i),
                top if req.logprobs else None,
                False,
            )
            for i in range(req.n)
        ]
        try:
            streams = submit(jobs)
        except APIError as e:
            if e.code == "context_length_exceeded":
                e.param = "messages"
            raise
        rid, created = new_id("chatcmpl"), int(time.time())
        head = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": config.model_name,
        }
        if req.stream:
            return StreamingResponse(
                _sse_chat(streams, head, req, usage, len(ids)), media_type="text/event-stream"
            )
        choices, completion_tokens = [], 0
        for index, (engine_req, stream) in enumerate(streams):
            result = await _collect(stream, request, engine_req)
            completion_tokens += result.done.completion_tokens
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": result.done.text},
                "logprobs": {"content": [_chat_logprob(t) for t in result.tokens if t.logprob]}
                if req.logprobs
                else None,
                "finish_reason": result.done.finish_reason,
            }
            if req.moekit.routing:
                choice["moekit"] = {"routing": result.routing}
            choices.append(choice)
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


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, "seed": seed})


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
        return [_routing_json(t) for t in self.tokens if t.id >= 0]


async def _collect(stream: _Stream, request: Any, engine_req: EngineRequest) -> _Result:
    tokens: list[TokenEvent] = []
    prompt: list[TokenLogprob | None] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(stream.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    engine_req.cancelled.set()
                continue
            if isinstance(event, DoneEvent):
                if event.finish_reason == "error":
                    raise APIError(500, event.error or "generation failed", type="server_error")
                return _Result(event, tokens, prompt)
            if isinstance(event, PromptEvent):
                prompt = event.logprobs
            else:
                tokens.append(event)
    except asyncio.CancelledError:
        engine_req.cancelled.set()
        raise


def _completion_logprobs(
    result: _Result, req: CompletionRequest, echo_text: str, prompt_ids: list[int], tokenizer: Any
) -> dict[str, Any]:
    entries: list[tuple[str, float | None, dict[str, float] | None]] = []
    if req.echo:
        for tid, lp in zip(
            prompt_ids, result.prompt_logprobs or [None] * len(prompt_ids), strict=False
        ):
            entries.append(
                (
                    tokenizer.decode([tid]),
                    lp.logprob if lp else None,
                    dict(lp.top) if lp and req.logprobs else None,
                )
            )
    for t in result.tokens:
        if t.logprob is not None:
            entries.append(
                (t.logprob.token, t.logprob.logprob, dict(t.logprob.top) if req.logprobs else None)
            )
    offsets, pos = [], 0
    for token, _, _ in entries:
        offsets.append(pos)
        pos += len(token)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [e[2] for e in entries],
        "text_offset": offsets,
    }


def _chat_logprob(t: TokenEvent) -> dict[str, Any]:
    assert t.logprob is not None
    return {
        "token": t.logprob.token,
        "logprob": t.logprob.logprob,
        "bytes": list(t.logprob.token.encode()),
        "top_logprobs": [
            {"token": tok, "logprob": lp, "bytes": list(tok.encode())} for tok, lp in t.logprob.top
        ],
    }


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _merged(streams: list[tuple[EngineRequest, _Stream]]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several requests as they come, tagged with the request's index."""
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
        for fut in pending.values():
            fut.cancel()
        for engine_req, _ in streams:
            engine_req.cancelled.set()  # a client that left mid-stream stops its generation


async def _sse_completions(
    streams: list[tuple[EngineRequest, _Stream]],
    head: dict[str, Any],
    echo_texts: list[str],
    req: CompletionRequest,
    usage: Callable[[int, int], dict[str, int]],
) -> AsyncIterator[bytes]:
    completion_tokens = 0
    for i, text in enumerate(echo_texts):
        if text:
            yield _sse(
                {
                    **head,
                    "choices": [
                        {"index": i, "text": text, "logprobs": None, "finish_reason": None}
                    ],
                }
            )
    async for i, event in _merged(streams):
        if isinstance(event, PromptEvent):
            continue
        if isinstance(event, DoneEvent):
            completion_tokens += event.completion_tokens
            if event.finish_reason == "error":
                yield _sse(
                    {
                        "error": {
                            "message": event.error,
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                continue
            yield _sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "text": "",
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                        }
                    ],
                }
            )
            continue
        choice: dict[str, Any] = {
            "index": i,
            "text": event.text,
            "logprobs": None,
            "finish_reason": None,
        }
        if req.logprobs is not None and event.logprob is not None:
            choice["logprobs"] = {
                "tokens": [event.logprob.token],
                "token_logprobs": [event.logprob.logprob],
                "top_logprobs": [dict(event.logprob.top)],
                "text_offset": [0],
            }
        if req.moekit.routing and event.id >= 0:
            choice["moekit"] = {"routing": [_routing_json(event)]}
        yield _sse({**head, "choices": [choice]})
    if req.stream_options and req.stream_options.include_usage:
        prompt_tokens = sum(len(r.prompt_ids) for r, _ in streams)
        yield _sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield b"data: [DONE]\n\n"


async def _sse_chat(
    streams: list[tuple[EngineRequest, _Stream]],
    head: dict[str, Any],
    req: ChatRequest,
    usage: Callable[[int, int], dict[str, int]],
    prompt_len: int,
) -> AsyncIterator[bytes]:
    head = {**head, "object": "chat.completion.chunk"}
    completion_tokens = 0
    for i in range(len(streams)):
        yield _sse(
            {
                **head,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
    async for i, event in _merged(streams):
        if isinstance(event, PromptEvent):
            continue
        if isinstance(event, DoneEvent):
            completion_tokens += event.completion_tokens
            if event.finish_reason == "error":
                yield _sse(
                    {
                        "error": {
                            "message": event.error,
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                continue
            yield _sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                        }
                    ],
                }
            )
            continue
        choice: dict[str, Any] = {
            "index": i,
            "delta": {"content": event.text},
            "logprobs": None,
            "finish_reason": None,
        }
        if req.logprobs and event.logprob is not None:
            choice["logprobs"] = {"content": [_chat_logprob(event)]}
        if req.moekit.routing and event.id >= 0:
            choice["moekit"] = {"routing": [_routing_json(event)]}
        yield _sse({**head, "choices": [choice]})
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


def build(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    device: str = "cpu",
) -> tuple[FastAPI, Engine]:
    """Load a model directory and return (app, engine); start the engine before serving."""
    generator = Generator.from_dir(model_dir, device=device)
    engine = Engine(generator, max_batch=max_batch, max_queue=max_queue)
    config = ServerConfig(
        model_name=model_name or Path(model_dir).resolve().name,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
    )
    return create_app(engine, config, ChatTemplate.load(model_dir)), engine


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
) -> None:
    """Serve a model directory over HTTP until interrupted (an OpenAI-compatible API at
    http://HOST:PORT/v1 and a playground page at http://HOST:PORT/)."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError(
            "moekit serve needs FastAPI and uvicorn: pip install 'moekit[serve]'"
        ) from None
    app, engine = build(
        model_dir,
        api_key=api_key,
        model_name=model_name,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens_limit=max_tokens_limit,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, name="moekit-http", daemon=True)
    http.start()
    try:
        engine.run()  # the heavy work stays in the main thread (see Engine.run)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
