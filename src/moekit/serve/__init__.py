"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a playground page that
shows the experts.

    from moekit.serve import serve, build
    serve("runs/demo", port=8000)          # until Ctrl-C or SIGTERM
    app, engine = build("runs/demo")      # or run the app and its engine yourself

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events ending with `data: [DONE]`), GET /health, GET /metrics (Prometheus text),
GET / (the playground, with its files under /static/) and GET /v1/moekit/info (what the page
needs to know about the model). With an API key set, every endpoint but /health requires it
(auth.py). A client that disconnects stops its generation: every choice of its request is
cancelled within a fraction of a second, streaming or not.

With or without a key, only the server's own page and allowed origins may call it from a
browser (origin.py), and a client must send its request in good time, on one of a bounded
number of connections (connections.py).

The modules, each with one job:

    protocol   request bodies and their validation; APIError
    config     ServerConfig: what the HTTP layer is told; ConnectionLimits
    admission  a validated request against the model and engine: checks, tokens, submission
    engine     continuous batching in one background thread; draining
    events     what goes into the engine (EngineRequest) and what comes back
    prefill    a prompt through the model, a chunk at a time
    prefix_cache  prompt blocks' keys and values, reused by prompts that start the same way
    streams    engine events into the event loop; watching the client
    responses  OpenAI response bodies
    sse        streamed answers as server-sent events
    errors     every failure as an OpenAI error body
    auth       the API key and the playground's cookie
    origin     the Host and Origin checks, and CORS for allowed origins
    body       reading a request body: size limit, JSON
    guard      middleware in front of every request: checks, metrics, crashes
    metrics    counters and Prometheus text
    routes     the endpoints
    app        the app factory: create_app, build
    connections deadlines for sending a request, and the cap on open connections
    server     serve: the socket, the HTTP thread, the engine, signals

Importing this package is cheap: FastAPI, uvicorn and torch load only when one of the names
below is first used (they need `pip install 'moekit[serve]'`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.serve.app import build, create_app
    from moekit.serve.config import ConnectionLimits, ServerConfig
    from moekit.serve.server import PortInUseError, serve

# name -> the module that defines it, imported on first access.
_LAZY = {
    "build": "moekit.serve.app",
    "create_app": "moekit.serve.app",
    "ServerConfig": "moekit.serve.config",
    "ConnectionLimits": "moekit.serve.config",
    "PortInUseError": "moekit.serve.server",
    "serve": "moekit.serve.server",
}

__all__ = ["ConnectionLimits", "PortInUseError", "ServerConfig", "build", "create_app", "serve"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
