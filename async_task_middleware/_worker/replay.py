"""The replay: a captured request run against the app as a server would run it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._shared.errors import ConfigurationError
from .._shared.types import REPLAY_KEY, WRAPPED_APPS, ASGIApp, Message, ReplayMark
from .._shared.wire import pack_response, request_scope
from .live import Relay
from .loop import process_loop

#: ``live(status, headers)``: the relay of a response that comes in more than one piece.
Live = Callable[[int, list[tuple[bytes, bytes]]], Relay]


class ResponseTooLarge(Exception):
    """The endpoint's response is larger than ``max_response_size``."""


class NoResponse(Exception):
    """The app returned without starting a response."""


async def replay(
    app: ASGIApp,
    envelope: dict[str, Any],
    headers: list[list[str]],
    limit: int,
    lifespan_timeout: float,
    live: Live | None = None,
) -> bytes:
    """Call the app as a server would, the way httpx's ASGITransport does: the body, then
    ``http.disconnect`` only after the response is complete.

    The worker may be given the app the server serves or the one the middleware wraps. Inside
    a mount the served app routes by the path below the server's ``root_path``, while the
    captured ``root_path`` ends with the mount's prefix: a replay that does not reach the
    middleware is made again with that ``root_path`` shortened a segment at a time (a mount's
    router answers the first with a 404 of its own), and one that never does is a clear error.

    A response sent in more than one piece goes to ``live`` as it is sent (``_worker.live``).
    """
    state = await process_loop().start_lifespan(app, lifespan_timeout)
    scope, body = request_scope(envelope, headers)
    name = str(envelope.get("app", ""))
    root_path: str = scope["root_path"]
    while True:
        mark = ReplayMark()
        tried = {**scope, "root_path": root_path, "state": dict(state), REPLAY_KEY: mark}
        packed = await _call(app, tried, body, limit, live)
        if mark.reached or WRAPPED_APPS.get(name) == id(app):
            return packed
        if not root_path:
            raise ConfigurationError(
                f"the replay of {scope['method']} {scope['path']} never reached the middleware "
                f"named {name!r}: the app the worker has under that name routes it elsewhere. "
                "Register the app the server serves, or the one the middleware wraps."
            )
        root_path = root_path.rsplit("/", 1)[0]


async def _call(
    app: ASGIApp, scope: dict[str, Any], body: bytes, limit: int, live: Live | None
) -> bytes:
    request_sent = False
    response_done = asyncio.Event()
    status: int | None = None
    response_headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    size = 0
    relay: Relay | None = None

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, size, relay
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers.extend((bytes(k), bytes(v)) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if size > limit:
                raise ResponseTooLarge(f"the response is larger than {limit} bytes")
            chunks.append(chunk)
            if relay is None and more and live is not None and status is not None:
                relay = live(status, response_headers)  # a response in pieces: relayed live
            if relay is not None:
                relay.add(chunk, not more)
            if not more:
                response_done.set()

    try:
        # Background tasks run inside this call, after the last body chunk: they are done
        # before the result is stored.
        await app(scope, receive, send)
        if relay is not None:
            await relay.close()
    except BaseException:
        if relay is not None:
            relay.abort()
        raise
    finally:
        response_done.set()
    if status is None:
        raise NoResponse("the app returned without sending a response")
    return pack_response(status, response_headers, b"".join(chunks))
