"""How failures reach a client: every error is an OpenAI-style JSON body with its status.

Request problems are raised as `APIError` (see protocol.py) wherever they are found; the
handlers installed here turn those, Starlette's own HTTP errors (404, 405) and any crash into
the same body shape, so a client never sees an HTML page or a bare traceback. A 500 is a bug
or a failed generation, so it is logged with its traceback on the "moekit.serve" logger: here
when it is an APIError, by the guard when it is a crash.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from moekit.serve.engine import DoneEvent
from moekit.serve.protocol import APIError

log = logging.getLogger("moekit.serve")


def error_response(err: APIError) -> Response:
    """The JSON response for `err`: its body, status and extra headers (e.g. Retry-After)."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def internal_error(exc: BaseException) -> APIError:
    """A 500 for a bug: it must cost one request, not the server."""
    return APIError(500, f"internal error: {exc}", type="server_error")


def ended_badly(done: DoneEvent) -> APIError | None:
    """The error a generation ended with (it failed, or the server is stopping), or None."""
    if done.finish_reason == "error":
        return APIError(500, done.error or "generation failed", type="server_error")
    if done.finish_reason == "abort":
        return APIError(503, done.error or "aborted", type="server_error", code="shutting_down")
    return None


def add_error_handlers(app: FastAPI) -> None:
    """Answer APIError, Starlette's HTTP errors and uncaught exceptions in the API's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        if exc.status == 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        # Starlette raises the exception again once this is sent: the guard logs it.
        return error_response(internal_error(exc))
