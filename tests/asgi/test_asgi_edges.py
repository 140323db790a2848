"""Protocol edges at the raw ASGI level: bodies in chunks, disconnects, pass-through scopes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio
from asgi_lifespan import LifespanManager

from async_task_middleware import AsyncTaskMiddleware
from tests.conftest import LOCATION, SWEEP_KEYS, final, make_client
from tests.worker import celery_app

pytestmark = pytest.mark.anyio

Message = dict[str, Any]


class Inner:
    """An ASGI app that records what reached it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        elif scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            text = (await receive())["text"]
            await send({"type": "websocket.send", "text": text.upper()})
            await send({"type": "websocket.close", "code": 1000})
        else:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"inner:" + body})


@asynccontextmanager
async def middleware(inner: Inner, **options: Any) -> AsyncIterator[AsyncTaskMiddleware]:
    """The middleware around ``inner``, its lifespan run so its connections get closed."""
    app = AsyncTaskMiddleware(
        inner, celery_app=celery_app, routes=["POST /echo"], name="probe", **options
    )
    async with LifespanManager(app):
        inner.scopes.clear()
        yield app


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: Any, scope: dict[str, Any], incoming: list[Message]) -> list[Message]:
    sent: list[Message] = []
    queue = list(incoming)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


async def record_count() -> int:
    client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
    try:
        keys = [key async for key in client.scan_iter(b"async-task-middleware-*")]
        return len([k for k in keys if k not in SWEEP_KEYS])  # the workers' own come and go
    finally:
        await client.aclose()


async def test_body_in_chunks_is_replayed_whole(worker: object) -> None:
    chunks = [{"type": "http.request", "body": part, "more_body": True} for part in (b"a", b"bc")]
    chunks.append({"type": "http.request", "body": b"d", "more_body": False})
    async with middleware(Inner()) as app:
        sent = await call(app, http_scope("POST", "/echo"), chunks)
    assert sent[0]["status"] == 303
    location = dict(sent[0]["headers"])[b"location"].decode()
    assert LOCATION.match(location)
    from tests.apps import probe_app

    async with LifespanManager(probe_app), make_client(probe_app) as client:
        seen = (await final(client, location)).json()
    assert seen["body"] == "YWJjZA=="  # base64 of b"abcd"
    assert seen["client"] == ["127.0.0.1", 5000]
    assert seen["server"] == ["127.0.0.1", 8000]


async def test_disconnect_mid_body_enqueues_nothing(redis_server: object) -> None:
    inner = Inner()
    before = await record_count()
    incoming = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.disconnect"},
    ]
    async with middleware(inner) as app:
        sent = await call(app, http_scope("POST", "/echo"), incoming)
    assert sent == []
    assert inner.scopes == []  # the app never saw the request
    assert await record_count() == before


async def test_chunked_body_over_limit_is_413(redis_server: object) -> None:
    before = await record_count()
    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 3
    async with middleware(Inner(), max_body_size=1000) as app:
        sent = await call(app, http_scope("POST", "/echo"), chunks)
    assert sent[0]["status"] == 413
    assert await record_count() == before


async def test_content_length_over_limit_is_413_before_reading(redis_server: object) -> None:
    # Nothing to receive: the answer comes from the header alone.
    scope = http_scope("POST", "/echo", [(b"content-length", b"1001")])
    async with middleware(Inner(), max_body_size=1000) as app:
        sent = await call(app, scope, [])
    assert sent[0]["status"] == 413


async def test_invalid_content_length_is_400(redis_server: object) -> None:
    scope = http_scope("POST", "/echo", [(b"content-length", b"nope")])
    async with middleware(Inner()) as app:
        sent = await call(app, scope, [])
    assert sent[0]["status"] == 400


async def test_lifespan_passes_through() -> None:
    inner = Inner()
    app = AsyncTaskMiddleware(inner, celery_app=celery_app, routes=["POST /echo"])
    sent = await call(
        app,
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert inner.scopes[0]["type"] == "lifespan"


async def test_websocket_passes_through() -> None:
    inner = Inner()
    scope = {**http_scope("GET", "/echo"), "type": "websocket"}
    async with middleware(inner) as app:
        sent = await call(
            app, scope, [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]
        )
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "HI"
    assert inner.scopes[0] is scope


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/echo"), ("PUT", "/echo"), ("POST", "/other"), ("POST", "/echo/x/y")],
)
async def test_unowned_requests_reach_the_app_untouched(method: str, path: str) -> None:
    inner = Inner()
    scope = http_scope(method, path)
    async with middleware(inner) as app:
        sent = await call(app, scope, [{"type": "http.request", "body": b"b"}])
    assert sent[1]["body"] == b"inner:b"
    assert inner.scopes[0] is scope
