"""Connections: how long a client may take to send its request, and how many may be open.

uvicorn's h11 protocol bounds the size of a request head (16 KiB) and the idle time between
requests on a kept-alive connection (`timeout_keep_alive`), but not the time to send a
request: a connection that sends nothing, or its request head or body a byte at a time, stays
open as long as the client likes; and its `limit_concurrency` is checked only once a request
head has arrived, counts requests too, and answers in plain text. So the server runs that
protocol with a deadline per connection and a count of open connections (ConnectionLimits):

- a request head must arrive within `header_timeout_s` of the connection opening, or of the
  first byte of a further request on a kept-alive connection;
- a request body within `body_timeout_s` of its head;
- past `max_connections` open at once, a new connection gets a 503 in the API's error shape
  (with `Connection: close`) as soon as its request head arrives; open connections, and the
  streams on them, are untouched.

A client past a deadline is disconnected; it first gets a 408 in the API's error shape when it
is in the middle of a request that has no answer yet (a connection that sent nothing gets no
bytes: it may be a browser's pre-opened connection, which would read them as the answer to
its next request). A malformed request gets uvicorn's 400, in the API's error shape too.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from moekit.serve.config import ConnectionLimits
from moekit.serve.errors import error_response
from moekit.serve.metrics import ConnectionStats
from moekit.serve.protocol import APIError

HEAD, BODY = "head", "body"  # what a connection is sending while a deadline runs

TOO_MANY = APIError(
    503,
    "the server has too many open connections; retry shortly",
    type="server_error",
    code="too_many_connections",
    headers={"Retry-After": "1", "Connection": "close"},
)


def protocol_class(limits: ConnectionLimits, stats: ConnectionStats) -> type[H11Protocol]:
    """The uvicorn protocol class (`uvicorn.Config(http=...)`) that enforces `limits` and
    counts in `stats`."""
    attrs = {"limits": limits, "stats": stats}
    return type("LimitedH11Protocol", (LimitedH11Protocol,), attrs)


def timeout_error(phase: str) -> APIError:
    """The 408 for a client that took too long to send its request's `phase`."""
    return APIError(408, f"the request {phase} took too long to arrive", code="request_timeout")


async def refuse(scope: Any, receive: Any, send: Any) -> None:
    """The app a connection past the limit gets: a 503 that closes the connection."""
    await error_response(TOO_MANY)(scope, receive, send)


def raw_response(err: APIError) -> bytes:
    """`err` as the bytes of an HTTP/1.1 response that closes the connection, for when no
    request is being answered (h11 will not send a response without one)."""
    body = json.dumps(err.body()).encode()
    head = (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on sending a request, a cap on open
    connections, and its 400 in the API's error shape. Make it with `protocol_class`."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    stats: ClassVar[ConnectionStats] = ConnectionStats()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: str | None = None  # whose deadline `timer` runs
        self.timer: asyncio.TimerHandle | None = None
        self.served = False  # a response was completed on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.stats.open = len(self.connections)
        if len(self.connections) > self.limits.max_connections:
            self.stats.refused += 1
            self.app = refuse  # answered at its request head, as cheaply as can be
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.arm(None)
        super().connection_lost(exc)
        self.stats.open = len(self.connections)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        self.served = True
        super().on_response_complete()
        self.watch()

    def sending(self) -> str | None:
        """What the client is sending now that has a deadline: its request head (a fresh
        connection, or bytes of a further request), its body, or nothing (a request being
        answered; an idle kept-alive connection, which uvicorn's keep-alive timeout closes)."""
        if self.transport.is_closing():
            return None
        theirs = self.conn.their_state
        if theirs is h11.SEND_BODY:
            return BODY
        if theirs is h11.IDLE and (not self.served or self.conn.trailing_data[0]):
            return HEAD
        return None

    def watch(self) -> None:
        """Start the deadline of what the client is sending, when that changed."""
        phase = self.sending()
        if phase != self.phase:
            self.arm(phase)

    def arm(self, phase: str | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.phase, self.timer = phase, None
        if phase is not None:
            limits = self.limits
            seconds = limits.header_timeout_s if phase == HEAD else limits.body_timeout_s
            self.timer = self.loop.call_later(seconds, self.expire)

    def expire(self) -> None:
        """The client missed its deadline: a 408 where a request is under way and unanswered
        (see the module's docstring), then the connection is closed."""
        phase, self.timer = self.phase, None
        if phase is None or self.transport.is_closing():
            return
        self.stats.timed_out[phase] = self.stats.timed_out.get(phase, 0) + 1
        started = phase == BODY or bool(self.conn.trailing_data[0])
        self.abandon(timeout_error(phase) if started else None)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request that is not valid HTTP, in the API's error shape."""
        self.abandon(APIError(400, "the request is not valid HTTP/1.1 (or its head is too large)"))

    def abandon(self, err: APIError | None) -> None:
        """Close the connection, answering `err` first when the request under way has no
        answer yet (never a second answer to a request already answered)."""
        ours, cycle = self.conn.our_state, self.cycle
        fresh = cycle is not None and not cycle.response_started
        if err is not None and (ours is h11.IDLE or (ours is h11.SEND_RESPONSE and fresh)):
            self.transport.write(raw_response(err))
        if cycle is not None and not cycle.response_complete:
            # The app sees its client gone (as when uvicorn loses a connection), and nothing
            # it sends from now on is written after this answer.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
