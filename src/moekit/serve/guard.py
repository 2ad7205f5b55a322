"""The guard: ASGI middleware in front of every request.

It runs the request checks in order (the API key, then the declared body size), answering the
first problem found without calling the app; it counts each API request and its latency for
/metrics (to the first byte of the body: the whole answer when not streaming, the first event
when streaming); and it turns a crash into a 500 for that request alone. Plain ASGI rather
than Starlette's BaseHTTPMiddleware, so that the endpoints see the real `receive` channel and
can notice a client that went away.

A check is a function of the request and the server's config that returns the APIError to
answer with, or None to let the request pass; a new check joins `CHECKS`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from moekit.serve.auth import check_api_key
from moekit.serve.body import check_content_length
from moekit.serve.config import ServerConfig
from moekit.serve.errors import error_response, internal_error
from moekit.serve.metrics import Metrics, endpoint_label
from moekit.serve.protocol import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Check = Callable[[Request, ServerConfig], APIError | None]

CHECKS: tuple[Check, ...] = (check_api_key, check_content_length)


class Guard:
    """Wraps `app`: every HTTP request passes `CHECKS` under `config`, and is counted in
    `metrics`."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status, started, first_byte = 500, False, None

        async def watched(message: Message) -> None:
            nonlocal status, started, first_byte
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif message["type"] == "http.response.body" and first_byte is None:
                first_byte = time.monotonic()
            await send(message)

        try:
            problem = self.check(Request(scope))
            if problem is not None:
                await error_response(problem)(scope, receive, watched)
            else:
                await self.app(scope, receive, watched)
        except Exception as exc:  # a bug must cost one request, not the server
            if started:  # too late for an error response
                raise
            await error_response(internal_error(exc))(scope, receive, watched)
        finally:
            endpoint = endpoint_label(scope["path"])
            if endpoint is not None:
                self.metrics.observe(endpoint, status, (first_byte or time.monotonic()) - t0)

    def check(self, request: Request) -> APIError | None:
        """The first problem `CHECKS` find with `request`, or None."""
        for check in CHECKS:
            problem = check(request, self.config)
            if problem is not None:
                return problem
        return None
