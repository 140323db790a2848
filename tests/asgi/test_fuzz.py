"""Property-based fuzzing: hostile methods, paths, headers, bodies and ids, against the
middleware in-process (a real Redis behind it) and, for ownership, with a real worker.

The budgets are fixed (``max_examples``) so that CI runs the same amount every time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_task_middleware import AsyncTaskMiddleware, header_owner
from tests._servers import RedisServer
from tests.conftest import final, submit
from tests.worker import SECRET_KEY

T = TypeVar("T")
LOCATION = re.compile(
    rb"^/[!-~]*/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
ROUTES = ["POST /echo", "PUT /items/{item_id:int}", "POST /files/{rest:path}"]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class LoopThread:
    """One event loop for the whole module, in a thread: hypothesis drives sync tests, and the
    middleware's Redis connections belong to one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def inner(scope: Any, receive: Any, send: Any) -> None:
    """The app behind the middleware: everything it does not own lands here."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopThread, Any]]:
    with RedisServer(tmp_path_factory.mktemp("fuzz-redis")) as server:
        celery_app = Celery("fuzz", broker=server.url, backend=server.url)
        app = AsyncTaskMiddleware(
            inner,
            celery_app=celery_app,
            routes=ROUTES,
            name="fuzz",
            owner=header_owner("authorization", cookies=["session"]),
            secret_key=SECRET_KEY,
            max_tasks_per_owner=50,
            max_body_size=4096,
        )
        loop = LoopThread()
        try:
            yield loop, app
        finally:
            for store in list(app._stores.values()):
                loop.run(store.aclose())
            loop.stop()


async def call(app: Any, scope: dict[str, Any], chunks: list[bytes]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


task_ids = st.one_of(
    st.uuids(version=4).map(str),
    st.uuids().map(str),
    st.text(max_size=80),
    st.just("../../etc/passwd"),
    st.just("%2e%2e%2f"),
)
marked = st.sampled_from(["/echo", "/items/7", "/files/x"])
paths = st.one_of(
    st.sampled_from(["/echo", "/items/7", "/files/a/b", "/other", "/"]),
    st.builds(
        lambda p, i: f"{p}/{i}", st.sampled_from(["/echo", "/items/7", "/files/x"]), task_ids
    ),
    st.text(min_size=0, max_size=300).map(lambda t: "/" + t),
    st.builds(lambda p, t: p + t, st.sampled_from(["/echo", "/items/"]), st.text(max_size=20)),
)
header_names = st.one_of(
    st.sampled_from(
        [
            b"content-length",
            b"authorization",
            b"cookie",
            b"prefer",
            b"idempotency-key",
            b"content-type",
            b"accept",
        ]
    ),
    st.binary(min_size=1, max_size=30),
)
headers = st.lists(st.tuples(header_names, st.binary(max_size=300)), max_size=8)


@FUZZ
@given(
    method=st.one_of(
        st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        st.text(max_size=12),
    ),
    path=paths,
    root_path=st.sampled_from(["", "/api"]),
    headers=headers,
    chunks=st.lists(st.binary(max_size=2048), max_size=4),
)
def test_the_middleware_answers_anything_sanely(
    fuzzed: tuple[LoopThread, Any],
    method: str,
    path: str,
    root_path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
) -> None:
    loop, app = fuzzed
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode("utf-8", "surrogatepass"),
        "root_path": root_path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    sent = loop.run(call(app, scope, chunks))  # never raises out of the middleware
    if not sent:
        return  # the client left mid-body: nothing to answer, nothing enqueued
    start = sent[0]
    assert start["type"] == "http.response.start"
    status = start["status"]
    assert sent[-1]["type"] == "http.response.body"
    assert status < 500 or status == 503, status  # no 5xx of its own but the documented one
    for _, value in start["headers"]:
        assert not re.search(rb"[\x00-\x1f\x7f]", value), value
    body = b"".join(m.get("body", b"") for m in sent[1:])
    if body == b"inner":
        return  # passed through
    response_headers = dict(start["headers"])
    if status == 303:
        assert LOCATION.match(response_headers[b"location"]), response_headers[b"location"]
    elif method != "HEAD" and status != 204:
        assert response_headers[b"content-type"] == b"application/problem+json"
        problem = json.loads(body)
        assert problem["status"] == status
        assert "Traceback" not in body.decode()


# -- never one task's data under another's id or owner, with the real worker ---------------

owners = st.sampled_from([None, "Bearer alice", "Bearer bob", "Bearer carol"])


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    submissions=st.lists(
        st.tuples(owners, st.binary(min_size=1, max_size=64)), min_size=12, max_size=12
    ),
    readers=st.lists(owners, min_size=12, max_size=12),
)
def test_no_task_is_served_under_another_id_or_owner(
    worker: Any, submissions: list[tuple[str | None, bytes]], readers: list[str | None]
) -> None:
    asyncio.run(_cross_owner(submissions, readers))


async def _cross_owner(
    submissions: list[tuple[str | None, bytes]], readers: list[str | None]
) -> None:
    from asgi_lifespan import LifespanManager

    from tests.apps import build_probe
    from tests.conftest import make_client
    from tests.worker import celery_app

    app = build_probe(celery_app, owner=header_owner("authorization"))
    async with LifespanManager(app), make_client(app) as client:
        locations = []
        for owner, body in submissions:
            auth = {"authorization": owner} if owner else {}
            locations.append(await submit(client, "/echo", content=body, headers=auth))
        for (owner, body), location, reader in zip(submissions, locations, readers, strict=True):
            auth = {"authorization": owner} if owner else {}
            mine = await final(client, location, headers=auth)
            assert mine.status_code == 200
            assert base64.b64decode(mine.json()["body"]) == body  # its own data, no other's
            other = {"authorization": reader} if reader else {}
            seen = await client.get(location, headers=other)
            if owner is None or reader == owner:
                assert seen.status_code == 200
                assert seen.content == mine.content
            else:
                assert seen.status_code == 404
            unknown = await client.get(location[:-36] + str(uuid.uuid4()), headers=auth)
            assert unknown.status_code == 404
