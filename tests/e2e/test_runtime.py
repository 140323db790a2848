"""The worker runtime: leases, time limits that hold on every pool, many I/O-bound replays per
process, and the promises a 303 makes ("retrying" shown, lifespan failures reported)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from celery import Celery

from tests._servers import RedisServer, Worker
from tests.apps import build_probe
from tests.conftest import final, make_client, runs, submit

pytestmark = pytest.mark.anyio

VISIBILITY = 4  # seconds: a replay of 20 s runs five times as long


def worker_on(server: RedisServer, log: Path, pool: str = "prefork", **env: str) -> Worker:
    settings = {"REDIS_URL": server.url, "BROKER_URL": "", "ATM_TEST_VISIBILITY": str(VISIBILITY)}
    concurrency = int(env.pop("concurrency", "2"))
    return Worker("tests.worker", {**settings, **env}, log, concurrency, pool)


@pytest.fixture
async def client(private_redis: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    celery_app = Celery("runtime", broker=private_redis.url, backend=private_redis.url)
    app = build_probe(celery_app)
    async with LifespanManager(app), make_client(app) as c:
        yield c


async def wait_status(
    client: httpx.AsyncClient, location: str, status: str, timeout: float
) -> float:
    """Seconds until the task's 202 body says ``status``."""
    started = time.monotonic()
    with anyio.fail_after(timeout):
        while (await client.get(location)).json().get("status") != status:
            await anyio.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.parametrize("pool", ["prefork", "replay"])
async def test_a_whole_worker_killed_is_redelivered_within_the_visibility_timeout(
    client: httpx.AsyncClient, private_redis: RedisServer, tmp_path: Path, pool: str
) -> None:
    """SIGKILL of the main process and its pool: the message stays in kombu's unacked index,
    no longer renewed, and comes back after the visibility timeout; meanwhile the status says
    "retrying"."""
    worker = worker_on(private_redis, tmp_path / "w.log", pool).start()
    key = f"whole-{uuid.uuid4()}"
    try:
        location = await submit(client, f"/mark?seconds=5&key={key}")
        await wait_status(client, location, "running", 20)
        worker.kill()
        killed = time.monotonic()
        await wait_status(client, location, "retrying", 10)
        worker.start()
        assert (await final(client, location, timeout=90)).status_code == 200
        recovered = time.monotonic() - killed
    finally:
        worker.stop()
    assert runs(private_redis, key) == 1
    assert recovered < 90
    print(f"whole-worker kill to completion: {recovered:.1f} s")


@pytest.mark.parametrize("pool", ["prefork", "replay"])
async def test_a_replay_five_times_the_visibility_timeout_runs_once(
    client: httpx.AsyncClient, private_redis: RedisServer, tmp_path: Path, pool: str
) -> None:
    """Leases keep renewing a running task's claim: a second worker beside it never gets it."""
    env = {"ATM_TEST_TIME_LIMIT": "60"}
    first = worker_on(private_redis, tmp_path / "a.log", pool, **env).start()
    second: Worker | None = None
    key = f"long-{uuid.uuid4()}"
    try:
        location = await submit(client, f"/mark?seconds={5 * VISIBILITY}&key={key}")
        await wait_status(client, location, "running", 20)
        second = worker_on(private_redis, tmp_path / "b.log", **env).start()
        assert (await final(client, location, timeout=60)).status_code == 200
        await anyio.sleep(VISIBILITY + 3)  # time for a wrong redelivery to show
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert runs(private_redis, key) == 1
    assert redis.Redis.from_url(private_redis.url).zcard("unacked_index") == 0


async def test_a_countdown_past_the_visibility_timeout_runs_once(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """A message waiting for its time (a webhook's retry is one) is held like a running one:
    the leases renew it, and a second worker beside it never gets it too."""
    first = worker_on(private_redis, tmp_path / "a.log").start()
    second: Worker | None = None
    key = f"countdown-{uuid.uuid4()}"
    try:
        celery_app = Celery("countdown", broker=private_redis.url, backend=private_redis.url)
        celery_app.send_task("tests.count", args=(key,), countdown=3 * VISIBILITY)
        await anyio.sleep(1)  # the first worker holds it now, waiting for its time
        second = worker_on(private_redis, tmp_path / "b.log").start()
        await anyio.sleep(3 * VISIBILITY + 6)  # its time, and time for a wrong second run
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert runs(private_redis, key) == 1


@pytest.mark.parametrize("pool", ["prefork", "threads"])
async def test_a_replay_that_blocks_its_loop_fails_alone(
    client: httpx.AsyncClient, private_redis: RedisServer, tmp_path: Path, pool: str
) -> None:
    """``time.sleep`` in an ``async def`` past the limit: that replay fails with a 500 and the
    ones after it on the same worker succeed (its process, or its loop, is replaced)."""
    worker = worker_on(
        private_redis, tmp_path / "w.log", pool, ATM_TEST_TIME_LIMIT="1", concurrency="1"
    ).start()
    try:
        started = time.monotonic()
        blocked = await submit(client, "/block?seconds=20")
        after = [await submit(client, "/echo", content=b"%d" % i) for i in range(3)]
        response = await final(client, blocked, timeout=30)
        assert response.status_code == 500
        assert time.monotonic() - started < 15
        for location in after:
            assert (await final(client, location, timeout=30)).status_code == 200
    finally:
        worker.stop()


async def test_the_time_limit_holds_on_the_threads_pool(
    client: httpx.AsyncClient, private_redis: RedisServer, tmp_path: Path
) -> None:
    worker = worker_on(
        private_redis, tmp_path / "w.log", "threads", ATM_TEST_TIME_LIMIT="1"
    ).start()
    try:
        started = time.monotonic()
        response = await final(client, await submit(client, "/slow?seconds=30"), timeout=20)
        assert response.status_code == 500
        assert time.monotonic() - started < 5
    finally:
        worker.stop()


async def test_a_lifespan_startup_past_its_timeout_fails_the_task(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """The app's lifespan startup (5 s) outlasts ``lifespan_timeout`` (1 s): the task fails
    at once, not at the time limit."""
    from starlette.applications import Starlette

    from async_task_middleware import AsyncTaskMiddleware
    from tests.worker import SECRET_KEY

    worker = worker_on(private_redis, tmp_path / "w.log", ATM_TEST_LIFESPAN_TIMEOUT="1").start()
    celery_app = Celery("runtime", broker=private_redis.url, backend=private_redis.url)
    web = AsyncTaskMiddleware(
        Starlette(),
        celery_app=celery_app,
        name="slow-lifespan",  # the worker replays into tests.apps:slow_lifespan_app
        routes=["POST /echo"],
        secret_key=SECRET_KEY,
    )
    try:
        async with LifespanManager(web), make_client(web) as c:
            started = time.monotonic()
            response = await final(c, await submit(c, "/echo", content=b"x"), timeout=20)
        assert response.status_code == 500
        assert time.monotonic() - started < 10
    finally:
        worker.stop()


@pytest.mark.parametrize("pool", ["replay", "threads"])
async def test_hundreds_of_io_bound_replays_in_one_worker_process(
    client: httpx.AsyncClient, private_redis: RedisServer, tmp_path: Path, pool: str
) -> None:
    """The command the docs give for I/O-bound endpoints (the replay pool, ``-c 500``), and
    Celery's threads pool: 500 replays of an endpoint that awaits 1 s, on one worker process,
    in a few seconds."""
    worker = worker_on(private_redis, tmp_path / "w.log", pool, concurrency="500").start()
    try:
        started = time.monotonic()
        locations = [await submit(client, "/slow?seconds=1") for _ in range(500)]
        submitted = time.monotonic() - started

        async def done(location: str) -> None:
            # Long polls, as the docs recommend for many waiters; a 503 (the store slower
            # than its deadline on a saturated machine) means "ask again".
            with anyio.fail_after(60):
                while True:
                    response = await client.get(location, headers={"prefer": "wait=30"})
                    if response.status_code not in (202, 503):
                        break
            assert response.status_code == 200

        async with anyio.create_task_group() as tg:
            for location in locations:
                tg.start_soon(done, location)
        elapsed = time.monotonic() - started
    finally:
        worker.stop()
    print(
        f"500 replays of a 1 s await on the {pool} pool: submitted in {submitted:.1f} s, "
        f"all done in {elapsed:.1f} s"
    )
    assert elapsed < 30


async def test_a_task_longer_than_the_result_lifetime_still_ends(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """``result_expires`` 3 s, a task of 6 s: the record is renewed while the task runs, and
    the result lives 3 s from completion, not from submission."""
    worker = worker_on(
        private_redis, tmp_path / "w.log", ATM_TEST_RESULT_EXPIRES="3", ATM_TEST_TIME_LIMIT="15"
    ).start()
    celery_app = Celery("runtime", broker=private_redis.url, backend=private_redis.url)
    celery_app.conf.result_expires = 3
    app = build_probe(celery_app)
    try:
        async with LifespanManager(app), make_client(app) as client:
            location = await submit(client, "/slow?seconds=6")
            response = await final(client, location, timeout=30)
            assert response.status_code == 200
            assert response.json() == {"slept": 6.0}
            await anyio.sleep(4)
            assert (await client.get(location)).status_code == 404  # 3 s after the end
    finally:
        worker.stop()
