"""Safe to put on the internet: the app's own middleware in front, results for their owner
only, bounded intake, no credential at rest in clear, and a 503 that promised nothing."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from celery import Celery
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from async_task_middleware import Route, header_owner
from tests._servers import RedisServer, Worker
from tests.apps import build_probe
from tests.conftest import SWEEP_KEYS, final, make_client, private_worker, submit

pytestmark = pytest.mark.anyio

TOKEN = "Bearer secret-token-8d1f0c"
# The auth tests echo theirs into results: a token of their own, not one the scans look for.
LET_IN = "Bearer let-me-in"
COOKIE = "session=secret-cookie-77ab21"
SECRETS = (b"secret-token-8d1f0c", b"secret-cookie-77ab21")
ORIGIN = "http://localhost:3000"


def wordcount_files(text: bytes = b"one two three") -> dict[str, Any]:
    return {"files": {"text": ("a.txt", text)}}


def task_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    # Per-task keys only: not the tombstones, not the sweep's own (run id, lock, workers).
    return [
        k
        for k in client.keys("async-task-middleware-*")
        if b"refused-" not in k and k not in SWEEP_KEYS
    ]


# -- placement: the app's own middleware runs first ----------------------------------------


class RequireToken:
    """A plain ASGI authentication middleware, as an app would have one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"authorization", LET_IN.encode()) not in scope["headers"]:
            await JSONResponse({"detail": "who are you?"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def test_auth_middleware_in_front_refuses_before_anything_is_enqueued(
    worker: Worker,
) -> None:
    from tests.worker import celery_app

    app = build_probe(celery_app, outer=[Middleware(RequireToken)])
    before = set(task_keys(os.environ["REDIS_URL"]))
    async with LifespanManager(app), make_client(app) as client:
        refused = await client.post("/echo", content=b"x")
        assert refused.status_code == 401
        assert refused.json() == {"detail": "who are you?"}
        assert set(task_keys(os.environ["REDIS_URL"])) == before  # nothing enqueued
        location = await submit(client, "/echo", content=b"x", headers={"authorization": LET_IN})
        assert (await client.get(location)).status_code == 401  # status URLs too
        response = await final(client, location, headers={"authorization": LET_IN})
    assert response.status_code == 200
    assert ["authorization", LET_IN] in response.json()["headers"]  # replayed, from the seal


async def test_cors_in_front_answers_on_the_marked_route_and_the_status_url(
    client: httpx.AsyncClient,
) -> None:
    preflight = await client.options(
        f"/words/{uuid.uuid4()}",
        headers={"origin": ORIGIN, "access-control-request-method": "GET"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    origin = {"origin": ORIGIN}
    submitted = await client.post("/words", headers=origin, **wordcount_files())
    assert submitted.status_code == 303
    assert submitted.headers["access-control-allow-origin"] == ORIGIN
    assert "location" in submitted.headers["access-control-expose-headers"].lower()
    response = await final(client, submitted.headers["location"], headers=origin)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


async def test_authorize_hook_runs_before_enqueueing_and_on_status_urls(worker: Worker) -> None:
    from tests.worker import celery_app

    calls: list[str] = []

    async def authorize(scope: Any) -> bool:
        calls.append(scope["method"])
        return (b"authorization", LET_IN.encode()) in scope["headers"]

    app = build_probe(celery_app, routes={"POST /echo": Route(authorize=authorize)})
    before = set(task_keys(os.environ["REDIS_URL"]))
    async with LifespanManager(app), make_client(app) as client:
        refused = await client.post("/echo", content=b"x")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert set(task_keys(os.environ["REDIS_URL"])) == before
        location = await submit(client, "/echo", content=b"x", headers={"authorization": LET_IN})
        assert (await client.get(location)).status_code == 401
        assert (await client.delete(location)).status_code == 401
        assert (await final(client, location, headers={"authorization": LET_IN})).status_code == 200
    assert calls[:2] == ["POST", "POST"]
    assert "DELETE" in calls


# -- ownership ----------------------------------------------------------------------------


async def test_only_the_owner_sees_or_deletes_a_task(client: httpx.AsyncClient) -> None:
    alice, bob = {"authorization": "Bearer alice"}, {"authorization": "Bearer bob"}
    location = await submit(client, "/words", headers=alice, **wordcount_files())
    done = await final(client, location, headers=alice)
    assert done.status_code == 200
    assert done.json() == {"count": 3}
    assert done.headers["cache-control"] == "private, no-store"

    unknown = await client.get(f"/words/{uuid.uuid4()}", headers=alice)
    for who in (bob, {}):
        for method in ("GET", "HEAD", "DELETE"):
            response = await client.request(method, location, headers=who)
            assert response.status_code == 404, (method, who)
            if method == "GET":
                # Exactly the 404 of an unknown id: same headers, same body but the path.
                assert response.headers == unknown.headers
                body = response.json()
                assert body["instance"] == location
                assert {**body, "instance": None} == {**unknown.json(), "instance": None}
    # Bob's DELETE changed nothing: the owner still reads it, then deletes it.
    assert (await client.get(location, headers=alice)).status_code == 200
    assert (await client.delete(location, headers=alice)).status_code == 204
    assert (await client.get(location, headers=alice)).status_code == 404


async def test_an_anonymous_task_is_a_bearer_capability(client: httpx.AsyncClient) -> None:
    location = await submit(client, "/words", **wordcount_files())
    assert (await final(client, location)).status_code == 200
    stranger = {"authorization": "Bearer someone"}
    assert (await client.get(location, headers=stranger)).status_code == 200
    assert (await client.delete(location, headers=stranger)).status_code == 204


# -- bounded intake -----------------------------------------------------------------------


def idle_app(url: str, **options: Any) -> Any:
    """The probe app on a Redis that no worker consumes: every accepted task stays queued."""
    celery_app = Celery("idle", broker=url, backend=url)
    return build_probe(celery_app, **options)


async def burst(client: httpx.AsyncClient, n: int, **kwargs: Any) -> list[httpx.Response]:
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await client.post("/echo", content=b"x", **kwargs))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return responses


async def test_owner_cap_holds_under_a_concurrent_burst(private_redis: RedisServer) -> None:
    app = idle_app(
        private_redis.url,
        owner=header_owner("authorization"),
        max_tasks_per_owner=5,
    )
    async with LifespanManager(app), make_client(app) as client:
        answers = await burst(client, 40, headers={"authorization": "Bearer alice"})
        codes = sorted(r.status_code for r in answers)
        assert codes == [303] * 5 + [429] * 35
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        # Another owner has a cap of its own; a DELETE frees a place.
        bob = await burst(client, 1, headers={"authorization": "Bearer bob"})
        assert bob[0].status_code == 303
        first = next(r for r in answers if r.status_code == 303).headers["location"]
        assert (
            await client.delete(first, headers={"authorization": "Bearer alice"})
        ).status_code == 204
        again = await burst(client, 2, headers={"authorization": "Bearer alice"})
        assert sorted(r.status_code for r in again) == [303, 429]
    queue = redis.Redis.from_url(private_redis.url).llen("celery")
    # Alice's five (the deleted one's message stays: a worker drops it), Bob's, Alice's sixth.
    assert queue == 5 + 1 + 1


async def test_route_queue_cap_holds_under_a_concurrent_burst(private_redis: RedisServer) -> None:
    app = idle_app(private_redis.url, max_queued_per_route=10)
    async with LifespanManager(app), make_client(app) as client:
        answers = await burst(client, 60)
    codes = sorted(r.status_code for r in answers)
    assert codes == [303] * 10 + [503] * 50
    assert all("retry-after" in r.headers for r in answers if r.status_code == 503)
    assert redis.Redis.from_url(private_redis.url).llen("celery") == 10
    records = [k for k in task_keys(private_redis.url) if b"queued-" not in k]
    assert len([k for k in records if b"message-" not in k]) == 10
    assert len([k for k in records if b"message-" in k]) == 10  # the copies kept for the sweep


async def test_a_trickling_body_is_a_408_and_nothing_is_enqueued(
    private_redis: RedisServer,
) -> None:
    app = idle_app(private_redis.url, body_timeout=0.3)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep(0.2)  # a byte at a time, slower than the deadline allows
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/echo",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    async with LifespanManager(app):
        with anyio.fail_after(3):
            await app(scope, receive, send)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert task_keys(private_redis.url) == []


# -- credentials at rest ------------------------------------------------------------------


def _expand(blob: bytes, depth: int = 0) -> Iterator[bytes]:
    """The blob and whatever it encodes: JSON strings, and base64 inside them."""
    yield blob
    if depth > 4:
        return
    try:
        parsed = json.loads(blob)
    except ValueError:
        return
    stack: list[Any] = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            raw = item.encode("utf-8", "surrogatepass")
            yield from _expand(raw, depth + 1)
            with contextlib.suppress(binascii.Error, ValueError):
                yield from _expand(base64.b64decode(raw, validate=True), depth + 1)


def every_value(url: str) -> Iterator[bytes]:
    client = redis.Redis.from_url(url)
    for key in client.keys("*"):
        yield key
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key)]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        elif kind == b"set":
            values = list(client.smembers(key))
        else:
            values = []
        for value in values:
            if value is not None:
                yield from _expand(value)


def assert_no_secret_at_rest(url: str) -> int:
    seen = 0
    for blob in every_value(url):
        seen += 1
        for secret in SECRETS:
            assert secret not in blob
    return seen


async def test_credentials_never_rest_in_clear(
    private_redis: RedisServer, tmp_path: Path, probe: httpx.AsyncClient
) -> None:
    secret_headers = {"authorization": TOKEN, "cookie": COOKIE}
    # Queued: on a Redis no worker consumes, the message sits in the queue list.
    app = idle_app(private_redis.url)
    async with LifespanManager(app), make_client(app) as idle:
        await submit(idle, "/echo", content=b"x", headers=secret_headers)
    assert redis.Redis.from_url(private_redis.url).llen("celery") == 1
    assert assert_no_secret_at_rest(private_redis.url) > 3

    # Running (the message in kombu's unacked hash) and finished, with the real worker.
    url = os.environ["REDIS_URL"]
    location = await submit(probe, "/slow?seconds=1.5", headers=secret_headers)
    with anyio.fail_after(10):
        while (await probe.get(location)).json()["status"] != "running":
            await anyio.sleep(0.05)
    assert redis.Redis.from_url(url).hlen("unacked") >= 1
    assert_no_secret_at_rest(url)
    assert (await final(probe, location)).status_code == 200
    assert_no_secret_at_rest(url)
    # The replay still sees them (this endpoint echoes them into its own result, which is
    # then the endpoint's doing: that result is deleted before the last scan).
    echo = await submit(probe, "/echo", headers=secret_headers)
    assert ["authorization", TOKEN] in (await final(probe, echo)).json()["headers"]
    assert (await probe.delete(echo)).status_code == 204
    assert_no_secret_at_rest(url)


# -- a 503 promised nothing ---------------------------------------------------------------

PAUSED_DEADLINE = 0.5


@pytest.fixture
async def paused_store(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Any]]:
    """The probe app and a real worker on a private Redis; the web side's deadline is short."""
    with private_worker(tmp_path) as (server, _):
        celery_app = Celery("paused", broker=server.url, backend=server.url)
        app = build_probe(celery_app, publish_timeout=PAUSED_DEADLINE, read_timeout=0.3)
        yield server, app


async def test_a_503_never_runs_even_when_the_script_lands_late(
    paused_store: tuple[RedisServer, Any],
) -> None:
    """Redis paused for longer than the deadline under 20 concurrent submissions, then
    resumed: every answer within the deadline (settling included), every 503 never runs,
    every 303 runs once."""
    server, app = paused_store
    answers: dict[str, int] = {}
    locations: dict[str, str] = {}
    took: dict[str, float] = {}

    async def one(key: str) -> None:
        start = time.perf_counter()
        response = await client.post(f"/mark?key={key}", content=b"x" * 200_000)
        took[key] = time.perf_counter() - start
        answers[key] = response.status_code
        if response.status_code == 303:
            locations[key] = response.headers["location"]

    async with LifespanManager(app), make_client(app) as client:
        # Open the pool's connections first: on a new one, redis-py waits for the handshake,
        # and a script never sent cannot land late.
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, f"warm-{i}")
        assert set(answers.values()) == {303}
        server.pause()  # the scripts sent now wait in their sockets, then land late
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, f"run-{i}")
            await anyio.sleep(3 * PAUSED_DEADLINE)
            server.resume()
        for key, location in locations.items():
            # Reads right after the pause may miss the short read deadline: polled again.
            response = await final(client, location, through_503=True)
            assert response.status_code == 200, key
    refused = [key for key, code in answers.items() if code == 503]
    assert refused, answers  # the pause did refuse some
    assert set(answers.values()) <= {303, 503}
    slowest = max(took[key] for key in answers if key.startswith("run-"))
    assert slowest <= PAUSED_DEADLINE + 0.1, f"an answer took {slowest:.3f} s"
    await anyio.sleep(3)  # time for any late message (or late settle) to reach the worker
    runs = redis.Redis.from_url(server.url)
    for key in refused:
        assert runs.get(key) is None, f"{key} was answered 503 but ran"
    for key in locations:
        assert runs.get(key) == b"1", f"{key} ran {runs.get(key)!r} times"


async def test_an_undecodable_message_fails_its_task_and_the_worker_goes_on(
    probe: httpx.AsyncClient,
) -> None:
    """A damaged message for a known record: a 500 at once, not 202 for a day; the worker
    stays up and never logs the message."""
    task_id = str(uuid.uuid4())
    store = redis.Redis.from_url(os.environ["REDIS_URL"])
    record = {"v": 1, "created": 0, "app": "probe", "route": "POST /echo", "owner": None}
    store.set(f"async-task-middleware-{task_id}", json.dumps(record), ex=600)
    garbage = {
        "body": "{this is not json",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"id": task_id, "task": "async_task_middleware.replay", "lang": "py"},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "delivery_mode": 2,
            "priority": 0,
        },
    }
    store.lpush("celery", json.dumps(garbage))
    response = await final(probe, f"/echo/{task_id}", timeout=15)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    after = await final(probe, await submit(probe, "/echo", content=b"still here"))
    assert after.status_code == 200
