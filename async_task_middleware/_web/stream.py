"""The status URL as a server-sent event stream (``Accept: text/event-stream``).

An ``event: status`` (data: the 202 body) at once and on each change, then one final event,
``event: done`` (data: the final status code and the status URL to read the response from) or
``event: failed``, and the stream closes. A comment line every 15 s keeps proxies from closing
an idle stream. Event ids are derived from the content, so a client reconnecting with
``Last-Event-ID`` is not sent again the state it already has. The stream shares the process's
one subscription (``_web.events``); when it is lost, the stream reads the state at each heartbeat
and subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any

from .._shared.metrics import waiting
from .._shared.types import Receive, Scope, Send
from .._shared.wire import WireFormatError, unpack_response
from .state import StoreUnavailable, TaskState
from .store import TaskStore
from .wait import disconnected

HEARTBEAT = 15.0


def wants_event_stream(scope: Scope) -> bool:
    return any(
        name == b"accept" and b"text/event-stream" in value
        for name, value in scope.get("headers", ())
    )


def _last_event_id(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"last-event-id":
            return bytes(value)
    return None


def _event(kind: str, data: dict[str, Any]) -> tuple[bytes, bytes]:
    payload = json.dumps(data, separators=(",", ":")).encode()
    event_id = hashlib.sha256(kind.encode() + payload).hexdigest()[:16].encode()
    return event_id, b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id, kind.encode(), payload)


def _final(state: TaskState, location: str) -> bytes:
    if state.record is None:
        return _event("failed", {"status": 404, "location": location})[1]  # deleted meanwhile
    if state.failed:
        return _event("failed", {"status": 500, "location": location})[1]
    assert state.outcome is not None
    try:
        code = unpack_response(state.outcome)[0]
    except WireFormatError:
        return _event("failed", {"status": 500, "location": location})[1]
    return _event("done", {"status": code, "location": location})[1]


async def stream_events(
    store: TaskStore,
    channel: bytes,
    task_id: str,
    location: str,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    loop = asyncio.get_running_loop()
    gone = loop.create_task(disconnected(receive))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),  # no buffering in nginx and the like
            ],
        }
    )

    async def emit(chunk: bytes, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": more})

    last_sent = _last_event_id(scope)
    with waiting():  # a held stream, in the waiters gauge
        try:
            while not gone.done():
                async with store.events.listen(channel, 1.0) as notes:
                    while True:
                        state = await store.read_batched(task_id)
                        if state.final:
                            await emit(_final(state, location), more=False)
                            return
                        event_id, chunk = _event("status", state.summary(task_id))
                        if event_id != last_sent:
                            await emit(chunk)
                            last_sent = event_id
                        note = loop.create_task(notes.get())
                        done, _ = await asyncio.wait(
                            {note, gone}, timeout=HEARTBEAT, return_when="FIRST_COMPLETED"
                        )
                        if gone in done:
                            note.cancel()
                            return
                        if note not in done:
                            note.cancel()
                            await emit(b": keep-alive\n\n")
                        elif note.result() is None:
                            break  # the subscription was lost: subscribe again
                await asyncio.wait({gone}, timeout=1.0)
        except StoreUnavailable:
            await emit(b"", more=False)  # the client reconnects with Last-Event-ID
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
