"""The guard: ASGI middleware in front of every request.

It runs the request checks in order (the Host, the Origin, the API key, then the declared body
size), answering the first problem found without calling the app; it answers the CORS
preflights of allowed origins and adds the CORS headers to their responses (origin.py); it
counts each API request and its latency for /metrics (to the first byte of the body: the whole
answer when not streaming, the first event when streaming), or, when the client went away
before any answer started (mid-upload, or while its generation ran), counts a disconnect
instead; and it turns a crash into a 500 for that request alone, logged with its traceback on
the "moekit.serve" logger. Plain ASGI rather than Starlette's BaseHTTPMiddleware, so that the
endpoints see the real `receive` channel and can notice a client that went away.

A check is a function of the request and the server's config that returns the APIError to
answer with, or None to let the request pass; a new check joins `CHECKS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from moekit.serve.auth import check_api_key
from moekit.serve.body import check_content_length
from moekit.serve.config import ServerConfig
from moekit.serve.errors import error_response, internal_error
from moekit.serve.metrics import Metrics, endpoint_label
from moekit.serve.origin import check_host, check_origin, cors_headers, preflight_response
from moekit.serve.protocol import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Check = Callable[[Request, ServerConfig], APIError | None]

# The Host and Origin first: a page that must not reach the server learns nothing of it.
CHECKS: tuple[Check, ...] = (check_host, check_origin, check_api_key, check_content_length)

log = logging.getLogger("moekit.serve")


class Exchange:
    """What the guard saw of one request: the answer's status, whether it started and
    finished, when its first body byte went out, and whether the client left before that
    answer started."""

    def __init__(self, send: Send, receive: Receive, extra: list[tuple[bytes, bytes]]) -> None:
        self._send, self._receive, self.extra = send, receive, extra
        self.status, self.started, self.finished = 500, False, False
        self.first_byte: float | None = None
        self.client_left = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            if self.extra:  # the CORS headers, where the response has not set its own
                headers = list(message.get("headers", []))
                have = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in self.extra if k not in have]
                message = {**message, "headers": headers}
        elif message["type"] == "http.response.body":
            self.first_byte = self.first_byte or time.monotonic()
            self.finished = not message.get("more_body", False)
        await self._send(message)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.started:
            self.client_left = True
        return message


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
        request = Request(scope)
        seen = Exchange(send, receive, cors_headers(request, self.config))
        try:
            await self.answer(request, seen)
        except ClientDisconnect:  # read after the client left: nobody to answer
            seen.client_left = True
        except Exception as exc:  # a bug must cost one request, not the server
            log.error("internal error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if seen.finished:  # answered (500) by the app's own handler, which re-raises
                return
            if seen.started:  # too late for an error response: the server drops the connection
                raise
            await error_response(internal_error(exc))(scope, receive, seen.send)
        finally:
            self.count(scope["path"], seen, t0)

    async def answer(self, request: Request, seen: Exchange) -> None:
        """Run the checks, then the preflight or the app."""
        scope = request.scope
        problem = self.check(request)
        if problem is not None:
            await error_response(problem)(scope, seen.receive, seen.send)
            return
        preflight = preflight_response(request, self.config)
        if preflight is not None:
            await preflight(scope, seen.receive, seen.send)
            return
        await self.app(scope, seen.receive, seen.send)

    def check(self, request: Request) -> APIError | None:
        """The first problem `CHECKS` find with `request`, or None."""
        for check in CHECKS:
            problem = check(request, self.config)
            if problem is not None:
                return problem
        return None

    def count(self, path: str, seen: Exchange, t0: float) -> None:
        endpoint = endpoint_label(path)
        if endpoint is None:
            return
        if seen.client_left:  # no answer was given, so neither a status nor a latency
            self.metrics.client_left(endpoint)
        else:
            self.metrics.observe(endpoint, seen.status, (seen.first_byte or time.monotonic()) - t0)
