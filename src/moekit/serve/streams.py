"""From the engine thread to the event loop: each request's events, and its client.

The engine calls a request's `emit` from its own thread; an `EventStream` carries those events
into an asyncio queue that a handler awaits. While a handler waits, it watches its client: a
client that disconnects (noticed by polling, or by a failed write) cancels every choice of its
request, streaming or not, so their batch slots are freed at the next decode step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from moekit.serve.errors import ended_badly
from moekit.serve.events import (
    DoneEvent,
    EngineRequest,
    Event,
    PromptEvent,
    TokenEvent,
    TokenLogprob,
)

DISCONNECT_POLL_S = 0.2  # how often a request checks whether its client is still there


class EventStream:
    """Engine events for one request, handed across threads into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


# One submitted choice: what the engine runs, and where its events arrive.
Submitted = tuple[EngineRequest, EventStream]


@dataclass
class Generation:
    """One choice's events, collected: how it ended, its tokens, its prompt's logprobs."""

    done: DoneEvent
    tokens: list[TokenEvent]
    prompt_logprobs: list[TokenLogprob | None]


async def cancel_on_disconnect(request: Request, reqs: list[EngineRequest]) -> None:
    """Cancel `reqs` as soon as the client goes away (polled: nothing tells us otherwise)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    for r in reqs:
        r.cancelled.set()


async def collect_all(request: Request, streams: list[Submitted]) -> list[Generation]:
    """Every choice's events until it is done, while watching the client: if it leaves, every
    choice is cancelled; if one choice fails (an APIError is raised), the others are too."""
    reqs = [r for r, _ in streams]
    watcher = asyncio.create_task(cancel_on_disconnect(request, reqs))
    try:
        return [await _collect(stream) for _, stream in streams]
    finally:
        watcher.cancel()
        for r in reqs:
            r.cancelled.set()  # a no-op for finished ones


async def _collect(stream: EventStream) -> Generation:
    tokens: list[TokenEvent] = []
    prompt: list[TokenLogprob | None] = []
    while True:
        event = await stream.queue.get()
        if isinstance(event, DoneEvent):
            problem = ended_badly(event)
            if problem is not None:
                raise problem
            return Generation(event, tokens, prompt)
        if isinstance(event, PromptEvent):
            prompt = event.logprobs
        else:
            tokens.append(event)


async def merged(request: Request, streams: list[Submitted]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several requests as they come, tagged with the request's index; a client
    that leaves (noticed by polling, or by the failed write that ends this generator) stops
    every one of them."""
    reqs = [r for r, _ in streams]
    watcher = asyncio.create_task(cancel_on_disconnect(request, reqs))
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
