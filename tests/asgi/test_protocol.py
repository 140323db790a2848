"""The protocol in full: Prefer: wait and long polls, the event stream, idempotency keys,
per-route settings, Retry-After, problem types, and the 202 + absolute Location shape."""

from __future__ import annotations

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

from async_task_middleware import Route
from async_task_middleware._web.headers import BadIdempotencyKey, idempotency_key, parse_prefer
from async_task_middleware._web.responses import Problem
from async_task_middleware._web.status import retry_after
from async_task_middleware._web.store import CLIENT_NAME
from tests._servers import RedisServer, Worker
from tests.apps import build_probe
from tests.conftest import LOCATION, final, make_client, submit

pytestmark = pytest.mark.anyio


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "wait", "respond_async"),
    [
        ([b"wait=10"], 10, False),
        ([b"respond-async, wait=5"], 5, True),
        ([b"respond-async", b"wait=3"], 3, True),
        ([b'wait="7"'], 7, False),
        ([b"wait=2.5; foo=bar"], 2.5, False),
        ([b"wait=-1"], None, False),
        ([b"wait=abc"], None, False),
        ([b"wait=99999999999"], None, False),
        ([b"return=minimal"], None, False),
        ([b"\x00\xff;;,,=="], None, False),
        ([b"wait=1, wait=9"], 1, False),
        ([], None, False),
    ],
)
def test_prefer(values: list[bytes], wait: float | None, respond_async: bool) -> None:
    parsed = parse_prefer([(b"prefer", v) for v in values])
    assert (parsed.wait, parsed.respond_async) == (wait, respond_async)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b'"abc-123"'], b"abc-123"),
        ([b"abc-123"], b"abc-123"),
        ([], None),
        ([b""], BadIdempotencyKey),
        ([b'""'], BadIdempotencyKey),
        ([b"x" * 256], BadIdempotencyKey),
        ([b"x" * 255], b"x" * 255),
        ([b"a b"], BadIdempotencyKey),
        ([b"a\x00b"], BadIdempotencyKey),
        ([b"caf\xc3\xa9"], BadIdempotencyKey),
        ([b"one", b"two"], BadIdempotencyKey),
    ],
)
def test_idempotency_key_parsing(values: list[bytes], expected: Any) -> None:
    headers = [(b"idempotency-key", v) for v in values]
    if expected is BadIdempotencyKey:
        with pytest.raises(BadIdempotencyKey):
            idempotency_key(headers)
    else:
        assert idempotency_key(headers) == expected


@pytest.mark.parametrize(
    ("base", "age", "expected"),
    [(1, 0, b"1"), (1, 9, b"1"), (1, 35, b"3"), (1, 3600, b"30"), (5, 0, b"5"), (60, 999, b"60")],
)
def test_retry_after_grows_with_age(base: int, age: float, expected: bytes) -> None:
    assert retry_after(base, {"created": time.time() - age}) == expected


def test_every_problem_has_a_stable_type() -> None:
    types = [problem.type for problem in Problem]
    assert len(set(types)) == len(types)
    assert all(t.startswith("urn:async-task-middleware:problem:") for t in types)


@pytest.mark.parametrize(
    "route",
    [{"wait": 0}, {"wait": "5"}, {"time_limit": -1}, {"retry_after": 1.5}, {"queue": "a b"}],
)
def test_bad_route_settings_refused(route: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        Route(**route)


# -- end to end, with the session's worker --------------------------------------------------


async def test_prefer_wait_answers_the_submission_with_the_result(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/words", headers={"prefer": "wait=10"}, files={"text": ("a.txt", b"one two three")}
    )
    assert response.status_code == 200
    assert response.json() == {"count": 3}
    assert response.headers["preference-applied"] == "wait=10"
    content_location = response.headers["content-location"]
    assert LOCATION.match(content_location)
    again = await client.get(content_location)
    assert again.status_code == 200
    assert again.content == response.content


async def test_prefer_wait_shorter_than_the_task_is_the_303(probe: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await probe.post("/slow?seconds=3", headers={"prefer": "wait=1"})
    elapsed = time.monotonic() - started
    assert response.status_code == 303
    assert 1 <= elapsed < 2.5


async def test_respond_async_is_always_the_303(probe: httpx.AsyncClient) -> None:
    response = await probe.post("/echo", headers={"prefer": "respond-async, wait=10"})
    assert response.status_code == 303
    assert response.headers["preference-applied"] == "respond-async"


async def test_long_poll_answers_the_moment_the_task_ends(probe: httpx.AsyncClient) -> None:
    location = await submit(probe, "/slow?seconds=1.5")
    started = time.monotonic()
    response = await probe.get(location, headers={"prefer": "wait=20"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=20"
    assert elapsed < 3
    # A wait shorter than the task: the 202 when it runs out.
    location = await submit(probe, "/slow?seconds=5")
    started = time.monotonic()
    response = await probe.get(location, headers={"prefer": "wait=1"})
    assert response.status_code == 202
    assert 1 <= time.monotonic() - started < 2.5


async def test_wait_is_capped_by_max_wait(worker: Worker) -> None:
    from tests.worker import celery_app

    app = build_probe(celery_app, max_wait=1)
    async with LifespanManager(app), make_client(app) as c:
        started = time.monotonic()
        response = await c.post("/slow?seconds=5", headers={"prefer": "wait=30"})
        assert response.status_code == 303
        assert time.monotonic() - started < 2.5


async def test_route_wait_is_the_default_wait(worker: Worker) -> None:
    from tests.apps import PROBE_ROUTES
    from tests.worker import celery_app

    routes = {spec: Route(wait=10) if spec == "POST /echo" else Route() for spec in PROBE_ROUTES}
    app = build_probe(celery_app, routes=routes)
    async with LifespanManager(app), make_client(app) as c:
        response = await c.post("/echo", content=b"waited")
        assert response.status_code == 200
        assert "content-location" in response.headers


async def test_event_stream(probe: httpx.AsyncClient) -> None:
    location = await submit(probe, "/progress?seconds=1.5")
    events = await read_stream(probe, location)
    kinds = [kind for kind, _, _ in events]
    assert kinds[-1] == "done"
    assert set(kinds[:-1]) == {"status"}
    statuses = [data for kind, data, _ in events if kind == "status"]
    assert any(s["progress"] == {"step": 1, "of": 2} for s in statuses)
    assert events[-1][1] == {"status": 200, "location": location}
    # Reconnecting with the last id seen: the state the client has is not sent again.
    location = await submit(probe, "/progress?seconds=3")
    first = await read_stream(probe, location, stop_after=1)
    last_id = first[0][2]
    again = await read_stream(probe, location, stop_after=1, last_event_id=last_id, timeout=10)
    assert again[0][2] != last_id


async def read_stream(
    client: httpx.AsyncClient,
    location: str,
    *,
    stop_after: int | None = None,
    last_event_id: str | None = None,
    timeout: float = 30,
) -> list[tuple[str, Any, str]]:
    headers = {"accept": "text/event-stream"}
    if last_event_id:
        headers["last-event-id"] = last_event_id
    events: list[tuple[str, Any, str]] = []
    with anyio.fail_after(timeout):
        async with client.stream("GET", location, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                    continue
                if fields:
                    events.append((fields["event"], json.loads(fields["data"]), fields["id"]))
                    fields = {}
                    if stop_after is not None and len(events) >= stop_after:
                        break
    return events


async def test_event_stream_of_someone_elses_task_is_404(worker: Worker) -> None:
    from async_task_middleware import header_owner
    from tests.worker import celery_app

    app = build_probe(celery_app, owner=header_owner("authorization"))
    async with LifespanManager(app), make_client(app) as c:
        alice = {"authorization": "Bearer alice"}
        location = await submit(c, "/slow?seconds=1", headers=alice)
        response = await c.get(location, headers={"accept": "text/event-stream"})
        assert response.status_code == 404


async def test_idempotency_key_same_request_same_task(probe: httpx.AsyncClient) -> None:
    key = {"idempotency-key": f'"{uuid.uuid4()}"'}
    first = await probe.post("/echo", content=b"same", headers=key)
    again = await probe.post("/echo", content=b"same", headers=key)
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    other = await probe.post("/echo", content=b"different", headers=key)
    assert other.status_code == 422
    assert other.json()["type"] == Problem.IDEMPOTENCY_CONFLICT.type
    assert (await probe.post("/echo?x=1", content=b"same", headers=key)).status_code == 422
    for bad in ["", "x" * 256, "a\tb", "é"]:
        response = await probe.post(
            "/echo", content=b"x", headers={"idempotency-key": bad.encode("utf-8")}
        )
        assert response.status_code == 400, bad
        assert response.json()["type"] == Problem.BAD_IDEMPOTENCY_KEY.type


async def test_fifty_concurrent_duplicates_make_one_task(probe: httpx.AsyncClient) -> None:
    key = {"idempotency-key": str(uuid.uuid4())}
    mark = f"idem-{uuid.uuid4()}"
    answers: list[httpx.Response] = []

    async def one() -> None:
        answers.append(await probe.post(f"/mark?key={mark}", headers=key))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert {r.status_code for r in answers} == {303}
    assert len({r.headers["location"] for r in answers}) == 1
    assert (await final(probe, answers[0].headers["location"])).status_code == 200
    await anyio.sleep(1)
    assert int(redis.Redis.from_url(os.environ["REDIS_URL"]).get(mark) or 0) == 1


def _form(boundary: bytes, text: bytes, field: bytes = b"text") -> tuple[dict[str, Any], bytes]:
    scope = {
        "method": "POST",
        "path": "/words",
        "query_string": b"",
        "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary)],
    }
    body = (
        b'--%s\r\ncontent-disposition: form-data; name="%s"; filename="t.txt"\r\n\r\n'
        b"%s\r\n--%s--\r\n" % (boundary, field, text, boundary)
    )
    return scope, body


def test_a_forms_fingerprint_does_not_depend_on_its_boundary() -> None:
    from async_task_middleware._web.body import fingerprint

    def fp(boundary: bytes, text: bytes = b"a b c", field: bytes = b"text") -> str:
        scope, body = _form(boundary, text, field)
        return fingerprint(scope, bytearray(body))

    assert fp(b"one") == fp(b"0f8e1d2c3b4a") == fp(b"'()+_,-./:=?")
    assert fp(b"one") != fp(b"one", b"a b d")  # another file
    assert fp(b"one") != fp(b"one", field=b"other")  # another field
    assert fp(b"one", b"a b c--x") != fp(b"one", b"a b c")
    # Quoted, and a parameter before it; the media type in any case.
    scope, body = _form(b"one", b"a b c")
    scope["headers"] = [(b"content-type", b'Multipart/Form-Data; charset=x; boundary="one"')]
    assert fingerprint(scope, bytearray(body)) == fp(b"zzz")


@pytest.mark.parametrize(
    "content_type",
    [
        b"multipart/form-data",  # no boundary
        b"multipart/form-data; boundary=",
        b"multipart/form-data; boundary=" + b"x" * 71,  # over RFC 2046's 70
        b"multipart/form-data; boundary=a\x00b",
        b"multipart/form-data; boundary=a\r\nb",
        b"multipart/form-data; boundary=one; boundary=two",
        b'multipart/form-data; boundary="ends-in-space "',
        b"text/plain; boundary=one",
    ],
)
def test_a_hostile_or_malformed_content_type_counts_the_bytes(content_type: bytes) -> None:
    """Anything but one well-formed boundary: the body's bytes, as for any other body, so a
    retry with another boundary is a conflict, never a match it should not be."""
    from async_task_middleware._web.body import fingerprint

    scope, body = _form(b"one", b"a b c")
    scope["headers"] = [(b"content-type", content_type)]
    other_scope, other_body = _form(b"two", b"a b c")
    other_scope["headers"] = [(b"content-type", content_type)]
    assert fingerprint(scope, bytearray(body)) != fingerprint(other_scope, bytearray(other_body))
    raw = dict(scope, headers=[])
    assert fingerprint(scope, bytearray(body)) == fingerprint(raw, bytearray(body))


async def test_a_form_sent_again_is_the_same_request(probe: httpx.AsyncClient) -> None:
    """httpx builds a new boundary for each send of ``files=``: the same form twice is one
    task; another file or field under the same key is 422."""
    key = {"idempotency-key": str(uuid.uuid4())}
    mark = f"form-{uuid.uuid4()}"
    url = f"/mark?key={mark}"
    first = await probe.post(url, files={"text": ("t.txt", b"a b c")}, headers=key)
    again = await probe.post(url, files={"text": ("t.txt", b"a b c")}, headers=key)
    # Re-encoded: another boundary.
    assert first.request.headers["content-type"] != again.request.headers["content-type"]
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    for files in ({"text": ("t.txt", b"a b d")}, {"other": ("t.txt", b"a b c")}):
        other = await probe.post(url, files=files, headers=key)
        assert other.status_code == 422, files
        assert other.json()["type"] == Problem.IDEMPOTENCY_CONFLICT.type


async def test_fifty_concurrent_reencoded_forms_make_one_task(probe: httpx.AsyncClient) -> None:
    key = {"idempotency-key": str(uuid.uuid4())}
    mark = f"form-{uuid.uuid4()}"
    answers: list[httpx.Response] = []

    async def one() -> None:
        files = {"text": ("t.txt", b"the same words")}
        answers.append(await probe.post(f"/mark?key={mark}", files=files, headers=key))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert len({r.request.headers["content-type"] for r in answers}) == 50
    assert [r.status_code for r in answers] == [303] * 50
    assert len({r.headers["location"] for r in answers}) == 1
    assert (await final(probe, answers[0].headers["location"])).status_code == 200
    await anyio.sleep(1)
    assert int(redis.Redis.from_url(os.environ["REDIS_URL"]).get(mark) or 0) == 1


# -- a Redis and workers of this module's own ------------------------------------------------


@pytest.fixture
def own_worker(private_redis: RedisServer, tmp_path: Path) -> Iterator[Worker]:
    env = {"REDIS_URL": private_redis.url, "BROKER_URL": ""}
    worker = Worker("tests.worker", env, tmp_path / "w.log").start()
    yield worker
    worker.stop()


def own_celery(server: RedisServer) -> Celery:
    return Celery("protocol", broker=server.url, backend=server.url)


async def test_a_thousand_long_polls_hold_a_handful_of_connections(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """1,000 waiting requests on ten tasks, in one web process: one subscription connection
    (and a few for reads), and every waiter answered within a second of its task's end."""
    env = {"REDIS_URL": private_redis.url, "BROKER_URL": ""}
    worker = Worker("tests.worker", env, tmp_path / "w.log", 20, "threads").start()
    app = build_probe(own_celery(private_redis))
    admin = redis.Redis.from_url(private_redis.url)
    answered: dict[str, list[float]] = {}
    async with LifespanManager(app), make_client(app) as c:
        tasks = [await submit(c, "/slow?seconds=3") for _ in range(10)]
        peak = 0

        def web_connections() -> int:
            return sum(1 for c in admin.client_list() if c["name"] == CLIENT_NAME)

        async def poll(location: str) -> None:
            response = await c.get(location, headers={"prefer": "wait=20"})
            assert response.status_code == 200
            answered.setdefault(location, []).append(time.monotonic())

        async def watch() -> None:
            nonlocal peak
            while sum(map(len, answered.values())) < 1000:
                peak = max(peak, web_connections())
                await anyio.sleep(0.1)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                for i in range(1000):
                    tg.start_soon(poll, tasks[i % 10])
        finally:
            worker.stop()
    assert 1 <= peak <= 5, peak
    assert sum(map(len, answered.values())) == 1000
    for times in answered.values():
        assert max(times) - min(times) < 1.0


async def get_then_leave(
    app: Any, location: str, header: tuple[bytes, bytes], seconds: float
) -> list[dict[str, Any]]:
    """A raw ASGI GET whose client leaves after ``seconds``; what the app sent. (httpx's
    in-process transport hands over a body only once it is whole.)"""
    sent: list[dict[str, Any]] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep(seconds)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": location,
        "root_path": "",
        "query_string": b"",
        "headers": [header],
    }
    with anyio.fail_after(seconds + 3):
        await app(scope, receive, send)
    return sent


async def test_a_waiter_that_leaves_frees_its_subscription(private_redis: RedisServer) -> None:
    app = build_probe(own_celery(private_redis))  # no worker: the task stays queued
    async with LifespanManager(app), make_client(app) as c:
        location = await submit(c, "/echo", content=b"x")
    async with LifespanManager(app):
        started = time.monotonic()
        sent = await get_then_leave(app, location, (b"prefer", b"wait=30"), 0.3)
        assert time.monotonic() - started < 2
        assert sent == []  # no one to answer
        middleware = app.middleware_stack
        while not hasattr(middleware, "_stores"):
            middleware = middleware.app
        await anyio.sleep(0.1)
        (store,) = middleware._stores.values()
        assert store.events.channels == 0


async def test_no_waiter_hangs_past_its_wait_when_redis_restarts(tmp_path: Path) -> None:
    """The subscription is lost with the restart (the append-only file keeps the task): every
    waiter falls back to a read at its deadline."""
    private_redis = RedisServer(tmp_path / "aof", persistent=True).start()
    app = build_probe(own_celery(private_redis), read_timeout=0.5)
    async with LifespanManager(app), make_client(app) as c:
        location = await submit(c, "/echo", content=b"x")
        results: list[tuple[int, float]] = []

        async def poll() -> None:
            started = time.monotonic()
            response = await c.get(location, headers={"prefer": "wait=3"})
            results.append((response.status_code, time.monotonic() - started))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(poll)
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(private_redis.stop)
            await anyio.to_thread.run_sync(private_redis.start)
    private_redis.stop()
    assert len(results) == 20
    for code, elapsed in results:
        assert code in (202, 503)
        assert elapsed < 3 + 1.5


async def test_route_queue_and_time_limit(private_redis: RedisServer, tmp_path: Path) -> None:
    from tests.apps import PROBE_ROUTES

    routes = {
        spec: Route(queue="reports", time_limit=1, retry_after=7)
        if spec == "POST /slow"
        else Route()
        for spec in PROBE_ROUTES
    }
    app = build_probe(own_celery(private_redis), routes=routes)
    env = {"REDIS_URL": private_redis.url, "BROKER_URL": ""}
    async with LifespanManager(app), make_client(app) as c:
        location = await submit(c, "/slow?seconds=5")
        assert redis.Redis.from_url(private_redis.url).llen("reports") == 1
        pending = await c.get(location)
        assert pending.headers["retry-after"] == "7"
        worker = Worker("tests.worker", env, tmp_path / "w.log", queues="reports").start()
        try:
            started = time.monotonic()
            response = await final(c, location, timeout=20)
            # The route's 1 s limit, not the worker's 20 s.
            assert response.status_code == 500
            assert time.monotonic() - started < 8
        finally:
            worker.stop()


async def test_202_and_absolute_location_drive_a_generic_poller(
    private_redis: RedisServer, own_worker: Worker
) -> None:
    """A long-running-operation poller that knows nothing of this library: follow Location
    while 202, honour Retry-After; the first non-202 is the result."""
    app = build_probe(own_celery(private_redis), submit_status=202, location_base="request")
    async with LifespanManager(app), make_client(app) as c:
        response = await c.post("/slow?seconds=1")
        assert response.status_code == 202
        assert response.headers["location"].startswith("http://testserver/slow/")
        polls = 0
        while response.status_code == 202:
            await anyio.sleep(min(float(response.headers["retry-after"]), 0.2))
            response = await c.get(response.headers["location"])
            polls += 1
        assert response.status_code == 200
        assert response.json() == {"slept": 1.0}
        assert polls >= 1
    app = build_probe(own_celery(private_redis), location_base="https://api.example")
    async with LifespanManager(app), make_client(app) as c:
        location = (await c.post("/echo")).headers["location"]
        assert location.startswith("https://api.example/echo/")
        hostile = await c.post("/echo", headers={"host": "evil\r\nx: y"})
        assert hostile.status_code == 303


@pytest.fixture
async def fresh_client(private_redis: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    app = build_probe(own_celery(private_redis))
    async with LifespanManager(app), make_client(app) as c:
        yield c


async def test_problem_types_on_the_wire(fresh_client: httpx.AsyncClient) -> None:
    response = await fresh_client.get(f"/echo/{uuid.uuid4()}")
    assert response.json()["type"] == Problem.NOT_FOUND.type
    response = await fresh_client.put(f"/echo/{uuid.uuid4()}")
    assert response.json()["type"] == Problem.METHOD_NOT_ALLOWED.type


async def test_event_stream_heartbeat(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A comment line keeps an idle stream open (every 15 s; 0.2 s here), until the client
    leaves."""
    from async_task_middleware._web import stream as _stream

    monkeypatch.setattr(_stream, "HEARTBEAT", 0.2)
    app = build_probe(own_celery(private_redis))  # no worker: the task stays queued
    async with LifespanManager(app), make_client(app) as c:
        location = await submit(c, "/echo", content=b"x")
    async with LifespanManager(app):
        sent = await get_then_leave(app, location, (b"accept", b"text/event-stream"), 1.5)
    assert sent[0]["status"] == 200
    text = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert text.startswith("id: ")
    assert 'event: status\ndata: {"task_id"' in text
    assert '"status":"queued"' in text
    assert text.count(": keep-alive\n\n") >= 3
