"""Broker and backend faults: a paused or stopped Redis is a prompt 503, never a hang."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from celery import Celery
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from async_task_middleware import AsyncTaskMiddleware
from tests._servers import RedisServer
from tests.conftest import make_client

pytestmark = pytest.mark.anyio

DEADLINE = 0.5


@pytest.fixture(params=["native", "celery"])
async def faulty(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> AsyncIterator[httpx.AsyncClient]:
    """The middleware on a Redis of its own; ``native`` pushes to the broker itself, ``celery``
    goes through Celery's publish in a thread (the broker is another database)."""
    broker = private_redis.url if request.param == "native" else private_redis.url[:-1] + "1"
    celery_app = Celery("faulty", broker=broker, backend=private_redis.url)
    celery_app.conf.update(
        broker_connection_timeout=DEADLINE,
        broker_transport_options={"socket_timeout": DEADLINE, "socket_connect_timeout": DEADLINE},
    )

    async def health(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = AsyncTaskMiddleware(
        Starlette(routes=[Route("/health", health)]),
        celery_app=celery_app,
        routes=["POST /jobs"],
        publish_timeout=DEADLINE,
        read_timeout=DEADLINE,
    )
    async with LifespanManager(app), make_client(app) as client:
        yield client


class LagMeter:
    """Measures how late a 5 ms sleep wakes up: the event loop's responsiveness."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await anyio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - start - 0.005)


async def timed(client: httpx.AsyncClient, method: str, url: str) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = await client.request(method, url, content=b"payload")
    return response, time.perf_counter() - start


async def test_paused_broker_is_503_within_deadline_loop_free(
    faulty: httpx.AsyncClient, private_redis: RedisServer
) -> None:
    accepted = await faulty.post("/jobs", content=b"before")
    assert accepted.status_code == 303
    location = accepted.headers["location"]

    private_redis.pause()
    meter = LagMeter()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(meter.run)
            for method, url in [("POST", "/jobs"), ("GET", location), ("DELETE", location)]:
                response, elapsed = await timed(faulty, method, url)
                assert response.status_code == 503, (method, response.text)
                assert response.headers["retry-after"] == "1"
                assert response.headers["content-type"] == "application/problem+json"
                # The whole answer, the settle of an unknown submission included.
                assert elapsed < DEADLINE + 0.1, (method, elapsed)
            # Unmarked routes do not touch Redis and stay fast.
            health, elapsed = await timed(faulty, "GET", "/health")
            assert health.status_code == 200
            assert elapsed < 0.2
            tg.cancel_scope.cancel()
    finally:
        private_redis.resume()
    assert meter.worst < 0.1, f"the event loop was blocked for {meter.worst:.3f} s"

    # Service resumes without a restart once Redis is back.
    with anyio.fail_after(10):
        while (await faulty.post("/jobs", content=b"after")).status_code != 303:
            await anyio.sleep(0.1)
    assert (await faulty.get(location)).status_code == 202


async def test_stopped_broker_is_503(faulty: httpx.AsyncClient, private_redis: RedisServer) -> None:
    private_redis.stop()
    response, elapsed = await timed(faulty, "POST", "/jobs")
    assert response.status_code == 503
    assert elapsed < DEADLINE + 0.1
    response, elapsed = await timed(faulty, "GET", f"/jobs/{uuid.uuid4()}")
    assert response.status_code == 503
    assert elapsed < DEADLINE + 0.1


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
async def test_failed_publish_leaves_no_record(private_redis: RedisServer, scheme: str) -> None:
    """Celery's publish path writes the record first; a refused publish takes it back."""

    from tests._servers import free_port

    broker = f"{scheme}://guest:guest@127.0.0.1:{free_port()}/"
    celery_app = Celery("faulty", broker=broker, backend=private_redis.url)
    celery_app.conf.broker_transport_options = {"confirm_publish": True}
    app = AsyncTaskMiddleware(
        Starlette(), celery_app=celery_app, routes=["POST /jobs"], publish_timeout=DEADLINE
    )
    async with LifespanManager(app), make_client(app) as client:
        response = await client.post("/jobs", content=b"x")
    assert response.status_code == 503
    assert_only_tombstones(private_redis)


def assert_only_tombstones(server: RedisServer) -> None:
    """No record is left, only the tombstone that stops a publish still on its way."""
    import redis

    keys = redis.Redis.from_url(server.url).keys("async-task-middleware-*")
    assert len(keys) == 1
    assert keys[0].startswith(b"async-task-middleware-refused-")


async def test_publish_outliving_its_deadline_leaves_no_record(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """A broker that hangs (paused) while the task store answers: 503 at the deadline, and the
    record written before the publish is taken back."""

    with RedisServer(tmp_path / "broker") as broker:
        celery_app = Celery("faulty", broker=broker.url, backend=private_redis.url)
        app = AsyncTaskMiddleware(
            Starlette(), celery_app=celery_app, routes=["POST /jobs"], publish_timeout=DEADLINE
        )
        assert app._binding.fast_queue is None  # another Redis: Celery's own publish, threaded
        broker.pause()
        try:
            async with LifespanManager(app), make_client(app) as client:
                response, elapsed = await timed(client, "POST", "/jobs")
        finally:
            broker.resume()
    assert response.status_code == 503
    assert elapsed < DEADLINE + 0.1
    assert_only_tombstones(private_redis)
