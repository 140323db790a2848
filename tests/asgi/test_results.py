"""Results stored ready to send: a large body is kept apart from the result, never read by a
poll's one ``MGET``, and sent in pieces as it is read."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
import redis

from async_task_middleware._shared.wire import (
    INLINE_BODY,
    pack_response,
    split_response,
    unpack_response,
)
from tests._servers import RedisServer
from tests.conftest import final, submit

pytestmark = pytest.mark.anyio

PREFIX = b"async-task-middleware-"


def _keys(location: str) -> tuple[bytes, bytes]:
    task_id = location.rsplit("/", 1)[1].encode()
    return PREFIX + b"result-" + task_id, PREFIX + b"body-" + task_id


def _echoed(response: httpx.Response) -> bytes:
    return base64.b64decode(response.json()["body"])


@pytest.mark.parametrize("size", [INLINE_BODY // 2, 3 * 1024 * 1024])
async def test_a_result_of_any_size_reads_back_whole(
    probe: httpx.AsyncClient, redis_server: RedisServer, size: int
) -> None:
    sent = os.urandom(size)
    location = await submit(probe, "/echo", content=sent)
    response = await final(probe, location)
    assert response.status_code == 200
    assert _echoed(response) == sent
    assert int(response.headers["content-length"]) == len(response.content)
    r = redis.Redis.from_url(redis_server.url)
    result_key, body_key = _keys(location)
    stored = r.get(result_key)
    assert stored is not None
    if size > INLINE_BODY:
        # The poll's MGET reads a few hundred bytes; the body lives beside, as long.
        assert len(stored) < 1024
        assert r.strlen(body_key) == len(response.content)
        assert abs(r.ttl(body_key) - r.ttl(result_key)) <= 1
        head = await probe.head(location)
        assert head.status_code == 200
        assert head.headers["content-length"] == response.headers["content-length"]
        assert head.content == b""
        assert (await probe.delete(location)).status_code == 204
        assert r.exists(result_key, body_key) == 0
    else:
        assert r.exists(body_key) == 0
    r.close()


async def test_a_large_result_answers_a_wait_and_an_event_stream(probe: httpx.AsyncClient) -> None:
    sent = os.urandom(1024 * 1024)
    waited = await probe.post("/echo", content=sent, headers={"prefer": "wait=20"})
    assert waited.status_code == 200
    assert _echoed(waited) == sent
    location = waited.headers["content-location"]
    async with probe.stream("GET", location, headers={"accept": "text/event-stream"}) as events:
        text = (await events.aread()).decode()
    assert "event: done" in text
    assert '"status":200' in text.replace(" ", "")


async def test_a_body_gone_before_the_answer_is_a_503(
    probe: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    location = await submit(probe, "/echo", content=os.urandom(200_000))
    assert (await final(probe, location)).status_code == 200
    r = redis.Redis.from_url(redis_server.url)
    r.delete(_keys(location)[1])
    r.close()
    response = await probe.get(location)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_body_gone_while_sent_ends_the_response_short(
    redis_server: RedisServer, probe: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.apps import probe_app

    location = await submit(probe, "/echo", content=os.urandom(2 * 1024 * 1024))
    assert (await final(probe, location)).status_code == 200
    r = redis.Redis.from_url(redis_server.url)
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) == 2:
            r.delete(_keys(location)[1])  # deleted after the first piece went out

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": location,
        "raw_path": location.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    with caplog.at_level(logging.WARNING):
        await probe_app(scope, receive, send)
    r.close()
    assert sent[0]["status"] == 200
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert all(m.get("more_body") for m in bodies)  # never a last piece: the response is short
    assert sum(len(m["body"]) for m in bodies) < int(dict(sent[0]["headers"])[b"content-length"])
    assert "cut short" in caplog.text


@pytest.mark.parametrize("size", [0, INLINE_BODY, INLINE_BODY + 1])
def test_split_keeps_small_bodies_inline_and_large_ones_apart(size: int) -> None:
    body = os.urandom(size)
    packed = pack_response(201, [(b"x-a", b"1")], body)
    head, apart = split_response(packed)
    status, headers, inline = unpack_response(head)
    assert (status, headers[0]) == (201, (b"x-a", b"1"))
    assert (b"content-length", str(size).encode()) in headers
    if size > INLINE_BODY:
        assert inline is None
        assert apart is not None
        assert bytes(apart) == body
    else:
        assert (head, apart, inline) == (packed, None, body)


async def test_celerys_own_result_says_success_once_the_response_is_stored(
    probe: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    """The worker writes Celery's SUCCESS meta with the outcome (one step, not Celery's own
    read-then-write): AsyncResult sees what it would see for any Celery task."""
    from celery.result import AsyncResult

    from tests.worker import celery_app

    r = redis.Redis.from_url(redis_server.url)
    location = await submit(probe, "/echo", content=b"hello")
    task_id = location.rsplit("/", 1)[1]
    assert (await final(probe, location)).status_code == 200
    result = AsyncResult(task_id, app=celery_app)
    assert result.state == "SUCCESS"
    assert result.result == {"v": 1, "stored": True}
    assert result.date_done is not None
    meta = json.loads(r.get(f"celery-task-meta-{task_id}"))  # type: ignore[arg-type]
    assert set(meta) == {"status", "result", "traceback", "children", "date_done", "task_id"}
    assert 0 < r.ttl(f"celery-task-meta-{task_id}") <= r.ttl(_keys(location)[0]) + 1
    r.close()
