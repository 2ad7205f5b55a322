"""The endpoints. Each reads what it needs from the app's `ServerState`; checks, generation
and response bodies live in their own modules (admission, streams, responses, sse).

    GET  /health               liveness (never needs the API key; 503 while draining)
    GET  /v1/models            the one model served
    GET  /v1/moekit/info       what the playground needs to know about the model
    GET  /metrics              Prometheus text
    GET  /                     the playground page, with its files under /static/
    POST /v1/completions       text completion, streaming or not
    POST /v1/chat/completions  chat completion, streaming or not
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.responses import Response

from moekit.infer.detokenize import TokenBytes
from moekit.params import count_params
from moekit.serve import responses, sse
from moekit.serve.admission import Admission, Job, prompt_list, with_seed
from moekit.serve.auth import set_page_cookie
from moekit.serve.body import read_json
from moekit.serve.config import ServerConfig
from moekit.serve.engine import Engine
from moekit.serve.metrics import CONTENT_TYPE, Metrics, prometheus_text
from moekit.serve.protocol import APIError, ChatRequest, CompletionRequest, parse
from moekit.serve.streams import collect_all
from moekit.serve.structured import grammar_for

STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


@dataclass
class ServerState:
    """What the endpoints of one app share (kept as `app.state.moekit`)."""

    engine: Engine
    config: ServerConfig
    admission: Admission
    metrics: Metrics
    token_bytes: TokenBytes
    started: float = field(default_factory=time.time)


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.moekit
    return state


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while serving; 503 with status "draining" once a shutdown began, so that a load
    balancer sends new requests elsewhere while the running ones finish."""
    s = state_of(request)
    serving = s.engine.accepting
    body = {
        "status": "ok" if serving else "draining",
        "model": s.config.model_name,
        "queue_depth": s.engine.queue_depth,
    }
    return JSONResponse(body, status_code=200 if serving else 503)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    s = state_of(request)
    model = {
        "id": s.config.model_name,
        "object": "model",
        "created": int(s.started),
        "owned_by": "moekit",
        "max_model_len": s.engine.max_context,
    }
    return {"object": "list", "data": [model]}


@router.get("/v1/moekit/info")
async def info(request: Request) -> dict[str, Any]:
    s = state_of(request)
    cfg, engine = s.engine.cfg, s.engine
    moe = cfg.moe
    return {
        "model": s.config.model_name,
        "max_seq_len": cfg.max_seq_len,
        "max_context": engine.max_context,
        "num_layers": cfg.num_layers,
        "moe_layers": cfg.moe_layers,
        "num_experts": moe.num_experts if moe else 0,
        # hierarchical routing: experts in equal contiguous groups (0: not grouped)
        "router_groups": moe.router_groups if moe and moe.router == "hierarchical" else 0,
        "group_top_k": moe.group_top_k if moe and moe.router == "hierarchical" else 0,
        "top_k": engine.default_top_k,
        "max_top_k": engine.max_top_k,
        "total_params": count_params(cfg).total,
        "active_params": count_params(cfg).active,
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    s = state_of(request)
    return PlainTextResponse(prometheus_text(s.engine, s.metrics), media_type=CONTENT_TYPE)


@router.get("/")
async def page(request: Request) -> Response:
    response = HTMLResponse(static_file("index.html").decode())
    set_page_cookie(request, response, state_of(request).config)
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    suffix = Path(name).suffix
    if "/" in name or suffix not in STATIC_TYPES:
        raise APIError(404, f"no static file {name!r}", type="not_found_error")
    try:
        data = static_file(name)
    except FileNotFoundError:
        raise APIError(404, f"no static file {name!r}", type="not_found_error") from None
    return Response(data, media_type=STATIC_TYPES[suffix])


def static_file(name: str) -> bytes:
    """A file of the playground, shipped inside the package."""
    return resources.files("moekit.serve").joinpath("static", name).read_bytes()


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    s = state_of(request)
    admit = s.admission
    req: CompletionRequest = parse(
        CompletionRequest, await read_json(request, s.config.max_body_bytes)
    )
    admit.check_model(req.model)
    grammar = await grammar_for(req, s.engine)
    prompts = prompt_list(req.prompt)
    admit.check_size(len(prompts) * req.n, req.n)
    encoded = await admit.encode_all(prompts, "prompt")
    echo_logprobs = req.echo and req.logprobs is not None
    # The legacy API's scoring request: the prompt's logprobs, nothing generated.
    scoring = req.echo and req.max_tokens == 0
    jobs = []
    for ids in encoded:
        params = admit.sampling(req, req.max_tokens, len(ids), "prompt", scoring=scoring)
        for i in range(req.n):
            seeded = with_seed(params, req.seed, i)
            jobs.append(Job(ids, seeded, req.logprobs, echo_logprobs, prompt_only=scoring))
            jobs[-1].grammar = grammar
    admit.replay(jobs, req.moekit)
    streams = admit.submit(jobs, "prompt")
    head = responses.head("cmpl", "text_completion", s.config.model_name)
    # Decoding a long prompt back to text, token by token, is slow too: off the event loop.
    echoes = await asyncio.to_thread(responses.echoes, admit.tokenizer, encoded, req)
    if req.stream:
        return sse.event_stream(sse.completion_events(request, streams, head, echoes, req))
    gens = await collect_all(request, streams)
    prompt_tokens = sum(len(ids) for ids in encoded) * req.n
    return responses.completion_body(head, gens, echoes, req, prompt_tokens)


@router.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    s = state_of(request)
    admit = s.admission
    req: ChatRequest = parse(ChatRequest, await read_json(request, s.config.max_body_bytes))
    admit.check_model(req.model)
    admit.check_size(req.n, req.n)
    tools = admit.tool_plan(req)
    grammar = await grammar_for(req, s.engine)
    forced = await asyncio.to_thread(admit.forced_grammar, req, tools)
    if forced is not None and grammar is not None:
        raise APIError(
            400,
            "a forced tool call (tool_choice) already constrains the answer; it cannot follow "
            "a response format too",
            param="tool_choice",
        )
    ids = await admit.chat_ids(req)
    params = admit.chat_sampling(req, len(ids))
    top = (req.top_logprobs or 0) if req.logprobs else None
    jobs = [Job(ids, with_seed(params, req.seed, i), top) for i in range(req.n)]
    for job in jobs:  # each choice follows the constraint with a matcher of its own
        job.grammar = forced or grammar
    admit.replay(jobs, req.moekit)
    streams = admit.submit(jobs, "messages")
    head = responses.head("chatcmpl", "chat.completion", s.config.model_name)
    if req.stream:
        events = sse.chat_events(request, streams, head, req, len(ids), s.token_bytes, tools)
        return sse.event_stream(events)
    gens = await collect_all(request, streams)
    return responses.chat_body(head, gens, req, len(ids) * req.n, s.token_bytes, tools)
