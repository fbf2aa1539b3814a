"""Server-sent events as OpenAI streams them, and noticing a client that went away.

A client that disconnects must stop the work it asked for, whether it was waiting for a whole
response or reading a stream. Both watch the ASGI ``receive`` channel for ``http.disconnect``
themselves instead of trusting the server to cancel them: uvicorn cancels nothing, and Starlette's
own streaming response stops listening once the server says ASGI spec 2.4 (it then notices only
when a write fails, which a stream that is quiet while an algorithm works would not do for long).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
"""The last event of an OpenAI stream."""


def event(data: Mapping[str, Any]) -> bytes:
    """One ``data:`` event; compact JSON, which never holds a raw newline."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def until_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, cancelled (and ClientGone raised) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone("the client disconnected")
    finally:
        for each in (task, watch):
            each.cancel()
        # Wait for the work to finish cancelling: what it spent is settled by then.
        await asyncio.wait((task, watch))


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` of ``events``. The stream stops when the client disconnects, at
    once, even while ``events`` is waiting; ``on_close`` is then awaited (shielded from that
    cancellation) however the stream ended, even where ``events`` never started."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: Mapping[str, str] | None = None) -> None:
        # no-cache: proxies must not hold events back; X-Accel-Buffering: nginx must not buffer them
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def write() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def watch() -> None:
                    await until_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(write)
                group.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                close = getattr(self._events, "aclose", None)
                if close is not None:
                    await close()
                await self._on_close()
