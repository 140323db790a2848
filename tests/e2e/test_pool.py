"""The replay pool (``ReplayPool``): a real worker process running it, a real Redis, the probe
app; the same outcomes as on Celery's own pools, with no thread held while a replay runs."""

from __future__ import annotations

import base64
import json
import signal
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
from celery.result import AsyncResult

from async_task_middleware import Retry, Route
from tests._servers import RedisServer, Worker
from tests.apps import PROBE_ROUTES, build_probe
from tests.conftest import final, make_client, runs, submit
from tests.faults.suite import RABBITMQ_URL, rabbitmq_up

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("pool") / "redis") as server:
        yield server


def replay_worker(server: RedisServer, log: Path, concurrency: int = 200) -> Worker:
    env = {"REDIS_URL": server.url, "BROKER_URL": "", "ATM_TEST_TIME_LIMIT": "3"}
    return Worker("tests.worker", env, log, concurrency, "replay")


@pytest.fixture(scope="module")
def worker(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = replay_worker(module_redis, tmp_path_factory.mktemp("pool") / "w.log").start()
    yield worker
    worker.stop()


@pytest.fixture
async def client(module_redis: RedisServer, worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    celery_app = Celery("pool", broker=module_redis.url, backend=module_redis.url)
    async with LifespanManager(app := build_probe(celery_app)), make_client(app) as c:
        yield c


async def test_the_outcomes_are_those_of_any_pool(
    client: httpx.AsyncClient, module_redis: RedisServer
) -> None:
    """A response as the endpoint sent it, the app's own 404, a failure as a 500 with Celery's
    FAILURE meta, progress while it runs; and the queue and the unacked index empty after."""
    echoed = await submit(client, "/echo?x=1", content=b"\x00hostile\r\n body")
    not_found = await submit(client, "/notfound")
    failed = await submit(client, "/boom")
    progressing = await submit(client, "/progress?seconds=1")

    response = await final(client, echoed)
    assert response.status_code == 200
    assert base64.b64decode(response.json()["body"]) == b"\x00hostile\r\n body"
    assert (await final(client, not_found)).status_code == 404
    response = await final(client, failed)
    assert response.status_code == 500
    assert b"secret detail" not in response.content
    celery_app = Celery("pool", broker=module_redis.url, backend=module_redis.url)
    assert AsyncResult(failed.rsplit("/", 1)[1], app=celery_app).state == "FAILURE"
    with anyio.fail_after(10):
        while (body := (await client.get(progressing)).json()).get("progress") is None:
            await anyio.sleep(0.05)
    assert body["progress"] == {"step": 1, "of": 2}
    assert (await final(client, progressing)).json() == {"done": True}
    admin = redis.Redis.from_url(module_redis.url)
    with anyio.fail_after(5):
        while admin.zcard("unacked_index") or admin.llen("celery"):
            await anyio.sleep(0.05)


async def test_a_delete_stops_the_running_replay(
    client: httpx.AsyncClient, module_redis: RedisServer
) -> None:
    """The beater cancels the replay's task on the loop: its side effect never happens, the
    status is 404, and the message is acknowledged."""
    key = f"deleted-{uuid.uuid4()}"
    location = await submit(client, f"/mark?seconds=2&key={key}")
    with anyio.fail_after(10):
        while (await client.get(location)).json().get("status") != "running":
            await anyio.sleep(0.05)
    assert (await client.delete(location)).status_code == 204
    await anyio.sleep(3)
    assert runs(module_redis, key) == 0
    assert (await client.get(location)).status_code == 404
    assert redis.Redis.from_url(module_redis.url).zcard("unacked_index") == 0


async def test_progress_of_an_async_endpoint_never_holds_up_the_loop(
    client: httpx.AsyncClient, module_redis: RedisServer
) -> None:
    """A replay reports progress while Redis holds every write for 2 s; another replay on the
    same loop is not held up, and the report is stored all the same, before the outcome."""
    measuring = await submit(client, "/lag?seconds=2")
    reporting = await submit(client, "/progress?delay=0.5&seconds=0.2")
    with anyio.fail_after(10):
        for location in (measuring, reporting):
            while (await client.get(location)).json().get("status") != "running":
                await anyio.sleep(0.02)
    admin = redis.Redis.from_url(module_redis.url)
    admin.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
    try:
        lag = (await final(client, measuring)).json()["lag"]
        assert (await final(client, reporting)).json() == {"done": True}
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    assert lag < 0.5, f"the loop was held up {lag:.2f} s"
    celery_app = Celery("pool", broker=module_redis.url, backend=module_redis.url)
    assert AsyncResult(reporting.rsplit("/", 1)[1], app=celery_app).state == "SUCCESS"


async def test_a_burst_of_progress_ends_with_the_last_report(
    client: httpx.AsyncClient, module_redis: RedisServer
) -> None:
    """500 reports in a row from an ``async def`` endpoint: what the status shows never goes
    back, ends at the last one, and the outcome replaces it once the task is done."""
    location = await submit(client, "/burst?n=500&seconds=1")
    seen: list[int] = []
    with anyio.fail_after(10):
        while not seen or seen[-1] != 500:
            body = (await client.get(location)).json()
            if body.get("progress") is not None:
                seen.append(body["progress"]["step"])
            await anyio.sleep(0.01)
    assert seen == sorted(seen), seen
    assert (await final(client, location)).json() == {"reported": 500}
    celery_app = Celery("pool", broker=module_redis.url, backend=module_redis.url)
    assert AsyncResult(location.rsplit("/", 1)[1], app=celery_app).state == "SUCCESS"


async def test_the_time_limit_holds(client: httpx.AsyncClient) -> None:
    """Past the 3 s limit an awaiting replay is cancelled in its loop: a 500 at once."""
    started = time.monotonic()
    assert (await final(client, await submit(client, "/slow?seconds=30"))).status_code == 500
    assert time.monotonic() - started < 5


async def test_a_blocked_loop_is_failed_and_replaced(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """A replay that blocks its loop has no thread waiting on it: the beater notices it past
    its deadline, the trace fails it, and the replays after it run on a new loop."""
    worker = replay_worker(private_redis, tmp_path / "w.log").start()
    celery_app = Celery("pool", broker=private_redis.url, backend=private_redis.url)
    app = build_probe(celery_app)
    try:
        async with LifespanManager(app), make_client(app) as c:
            started = time.monotonic()
            blocked = await submit(c, "/block?seconds=20")
            assert (await final(c, blocked, timeout=30)).status_code == 500
            assert time.monotonic() - started < 12  # 3 s limit, 5 s grace, a beat or two
            after = [await submit(c, "/echo", content=b"after %d" % i) for i in range(5)]
            for location in after:
                assert (await final(c, location, timeout=10)).status_code == 200
    finally:
        worker.stop()
    assert "the replay did not stop within its 3 s limit" in (tmp_path / "w.log").read_text()


async def test_a_warm_shutdown_lets_running_replays_finish(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM with 50 replays running: the worker stops taking messages, each running one ends
    and is stored, each runs once, and nothing is left unacknowledged."""
    worker = replay_worker(private_redis, tmp_path / "w.log").start()
    celery_app = Celery("pool", broker=private_redis.url, backend=private_redis.url)
    app = build_probe(celery_app)
    keys = [f"warm-{uuid.uuid4()}" for _ in range(50)]
    admin = redis.Redis.from_url(private_redis.url)
    try:
        async with LifespanManager(app), make_client(app) as c:
            locations = [await submit(c, f"/mark?seconds=2&key={key}") for key in keys]
            with anyio.fail_after(10):
                while admin.llen("celery"):
                    await anyio.sleep(0.05)
            worker._proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            with anyio.fail_after(20):
                while worker._proc.poll() is None:  # type: ignore[union-attr]
                    await anyio.sleep(0.1)
            for location in locations:
                response = await c.get(location)
                assert response.status_code == 200, response.text
                assert response.json()["marked"] in keys
    finally:
        worker.stop()
    assert [runs(private_redis, key) for key in keys] == [1] * 50
    assert admin.zcard("unacked_index") == 0


async def test_other_tasks_run_as_on_the_threads_pool(
    module_redis: RedisServer, worker: Worker
) -> None:
    """A plain Celery task on the same worker runs in a thread, as Celery's threads pool runs
    it: its result is stored."""
    celery_app = Celery("pool", broker=module_redis.url, backend=module_redis.url)
    celery_app.conf.accept_content = ["json"]
    result = celery_app.send_task("tests.add", args=[2, 3])
    assert await anyio.to_thread.run_sync(lambda: result.get(timeout=20)) == 5
    assert (
        json.loads(redis.Redis.from_url(module_redis.url).get(f"celery-task-meta-{result.id}"))[
            "status"
        ]
        == "SUCCESS"
    )


@pytest.mark.skipif(not rabbitmq_up(), reason="no RabbitMQ on 127.0.0.1:5672")
async def test_on_rabbitmq(private_redis: RedisServer, tmp_path: Path) -> None:
    """With RabbitMQ as the broker (a queue of this test's own on the shared server): results,
    a failure, and every message acknowledged (none back in the queue when the worker goes)."""
    queue = f"pool-{uuid.uuid4().hex}"
    env = {"REDIS_URL": private_redis.url, "BROKER_URL": RABBITMQ_URL, "ATM_TEST_TIME_LIMIT": "3"}
    worker = Worker("tests.worker", env, tmp_path / "w.log", 50, "replay", queues=queue).start()
    celery_app = Celery("pool", broker=RABBITMQ_URL, backend=private_redis.url)
    celery_app.conf.update(
        task_default_queue=queue, broker_transport_options={"confirm_publish": True}
    )
    app = build_probe(celery_app)
    try:
        async with LifespanManager(app), make_client(app) as c:
            slow = [await submit(c, "/slow?seconds=1") for _ in range(30)]
            failed = await submit(c, "/boom")
            for location in slow:
                assert (await final(c, location)).json() == {"slept": 1.0}
            assert (await final(c, failed)).status_code == 500
        worker.stop()  # RabbitMQ requeues what a consumer leaves unacknowledged
        with celery_app.connection_for_write() as connection:
            assert connection.default_channel.queue_declare(queue, passive=True).message_count == 0
    finally:
        worker.stop()
        with celery_app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)


async def test_a_message_delivered_twice_at_once(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """The same message twice in the queue (a duplicate, as a restore after a lost lease
    makes): the pool takes both at once, each delivery runs once (at least once, as
    documented) and is acknowledged, the outcome is stored, and the pool serves on."""
    celery_app = Celery("pool", broker=private_redis.url, backend=private_redis.url)
    app = build_probe(celery_app)
    admin = redis.Redis.from_url(private_redis.url)
    key = f"twice-{uuid.uuid4()}"
    async with LifespanManager(app), make_client(app) as c:
        location = await submit(c, f"/mark?seconds=1&key={key}")
        task_id = location.rsplit("/", 1)[1]
        queue, message = admin.hmget(f"async-task-middleware-message-{task_id}", "queue", "message")
        assert queue is not None
        assert message is not None
        admin.lpush(queue, message)
        worker = replay_worker(private_redis, tmp_path / "w.log").start()
        try:
            assert (await final(c, location)).json() == {"marked": key}
            after = [await submit(c, "/echo", content=b"after") for _ in range(20)]
            for other in after:
                assert (await final(c, other, timeout=10)).status_code == 200
            with anyio.fail_after(5):
                while admin.zcard("unacked_index") or admin.llen(queue):
                    await anyio.sleep(0.05)
        finally:
            worker.stop()
    assert runs(private_redis, key) == 2
    log = (tmp_path / "w.log").read_text()
    assert log.count(f"task {task_id} finished: POST /mark 200") == 2
    assert "Traceback" not in log


async def drained_pool_stats(celery_app: Celery, admin: redis.Redis) -> dict[str, Any]:
    """Once every message is taken and acknowledged, the replay pool's ``celery inspect stats``."""
    with anyio.fail_after(10):
        while admin.zcard("unacked_index") or admin.llen("celery"):
            await anyio.sleep(0.05)
    stats = await anyio.to_thread.run_sync(lambda: celery_app.control.inspect(timeout=5).stats())
    assert stats is not None
    (pool,) = (worker_stats["pool"] for worker_stats in stats.values())
    return dict(pool)


async def test_queued_deliveries_begin_together(private_redis: RedisServer, tmp_path: Path) -> None:
    """300 replays queued before the worker starts, every tenth deleted: the pool begins
    deliveries that follow one another in batches, one round trip for their ``BEGIN``s, and
    stores the outcomes of the replays that end together in one round trip (as ``celery inspect
    stats`` reports them); each batch keeps each delivery's own answer: the deleted never run,
    every other runs once, all are acknowledged."""
    celery_app = Celery("pool", broker=private_redis.url, backend=private_redis.url)
    app = build_probe(celery_app)
    admin = redis.Redis.from_url(private_redis.url)
    keys = [f"together-{uuid.uuid4()}" for _ in range(300)]
    deleted = set(range(0, len(keys), 10))
    async with LifespanManager(app), make_client(app) as c:
        locations = [await submit(c, f"/mark?key={key}") for key in keys]
        for i in deleted:
            assert (await c.delete(locations[i])).status_code == 204
        worker = replay_worker(private_redis, tmp_path / "w.log").start()
        try:
            for i, location in enumerate(locations):
                if i not in deleted:
                    assert (await final(c, location)).json() == {"marked": keys[i]}
            pool = await drained_pool_stats(celery_app, admin)
        finally:
            worker.stop()
    assert pool["deliveries begun"] == len(keys)
    assert pool["begin round trips"] < pool["deliveries begun"] / 2, pool
    assert pool["replays ended"] == len(keys)
    # The deleted ones store nothing; the others end together, as they began.
    assert pool["outcomes stored together"] > 150, pool
    assert pool["their round trips"] < pool["outcomes stored together"] / 2, pool
    assert [runs(private_redis, key) for key in keys] == [
        0 if i in deleted else 1 for i in range(len(keys))
    ]
    log = (tmp_path / "w.log").read_text()
    assert log.count("dropped: its record is gone") == len(deleted)
    assert "Traceback" not in log


async def test_only_outcomes_with_nothing_before_them_are_stored_together(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Replays that end together, queued while the worker is paused: plain ones, whose
    outcomes go in one round trip, beside a route with a ``Retry`` policy (its first answer, a
    503, is retried, not stored), one that ends as it reports progress (its last report is
    stored before its outcome, which it would otherwise overwrite) and replays deleted while
    they run (never stored): each ends as on any pool."""
    celery_app = Celery("pool", broker=private_redis.url, backend=private_redis.url)
    routes = {spec: Route() for spec in PROBE_ROUTES}
    again = Retry(attempts=2, on_status=(503,), backoff=0.2, jitter=False)
    routes["POST /flaky"] = Route(retries=again)
    app = build_probe(celery_app, routes=routes)
    admin = redis.Redis.from_url(private_redis.url)
    plain = [f"plain-{uuid.uuid4()}" for _ in range(60)]
    flaky = [f"flaky-{uuid.uuid4()}" for _ in range(20)]
    gone = [f"gone-{uuid.uuid4()}" for _ in range(20)]
    async with LifespanManager(app), make_client(app) as c:
        worker = replay_worker(private_redis, tmp_path / "w.log").start()
        try:
            # One replay first: Redis has the scripts, which a batch calls by their digests.
            warm = f"warm-{uuid.uuid4()}"
            assert (await final(c, await submit(c, f"/mark?key={warm}"))).status_code == 200
            worker.pause()
            marked = [await submit(c, f"/mark?key={key}&seconds=0.5") for key in plain]
            retried = [await submit(c, f"/flaky?key={key}&fail=1&how=status") for key in flaky]
            reported = [await submit(c, "/burst?n=50&seconds=0") for _ in range(20)]
            deleted = [await submit(c, f"/mark?key={key}&seconds=5") for key in gone]
            worker.resume()
            for key, location in zip(plain, marked, strict=True):
                assert (await final(c, location)).json() == {"marked": key}
            for location in deleted:  # running: their 5 s are not over
                assert (await c.get(location)).status_code == 202
                assert (await c.delete(location)).status_code == 204
            for location in retried:
                answer = await final(c, location)
                assert (answer.status_code, answer.json()) == (200, {"runs": 2})
            for location in reported:
                assert (await final(c, location)).json() == {"reported": 50}
            await anyio.sleep(5)  # the deleted replays' time: had they run on, they marked
            pool = await drained_pool_stats(celery_app, admin)
            for location in deleted:
                assert (await c.get(location)).status_code == 404
        finally:
            worker.stop()
    ended = 1 + 60 + 2 * 20 + 20 + 20  # the flaky ones twice
    assert pool["replays ended"] == ended, pool
    # The plain outcomes, most of the 60, in a few round trips; no other.
    assert 30 <= pool["outcomes stored together"] <= 60, pool
    assert pool["their round trips"] <= pool["outcomes stored together"] / 3, pool
    for location in reported:  # its report did not land on the stored outcome
        assert AsyncResult(location.rsplit("/", 1)[1], app=celery_app).state == "SUCCESS"
    assert {key: runs(private_redis, key) for key in plain + flaky + gone} == {
        **dict.fromkeys(plain, 1),
        **dict.fromkeys(flaky, 2),
        **dict.fromkeys(gone, 0),
    }
    log = (tmp_path / "w.log").read_text()
    assert log.count("dropped: its record is gone") == len(gone)
    assert "Traceback" not in log


async def test_deliveries_begun_together_survive_a_paused_redis_and_lost_scripts(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """While 600 queued replays are begun in batches, Redis is paused for 2 s (a batch's round
    trip waits) and then forgets its scripts every 100 ms (a batched ``BEGIN`` answers
    NOSCRIPT, and that delivery falls back to its own ``BEGIN``, which loads it again): every
    replay runs and is stored, and every message is acknowledged."""
    celery_app = Celery("pool", broker=private_redis.url, backend=private_redis.url)
    app = build_probe(celery_app)
    admin = redis.Redis.from_url(private_redis.url)
    keys = [f"hostile-{uuid.uuid4()}" for _ in range(600)]
    async with LifespanManager(app), make_client(app) as c:
        locations = [await submit(c, f"/mark?key={key}&seconds=0.5") for key in keys]
        worker = replay_worker(private_redis, tmp_path / "w.log").start()
        try:
            with anyio.fail_after(10):
                while admin.llen("celery") > 500:  # batches are being begun
                    await anyio.sleep(0.01)
            private_redis.pause()
            await anyio.sleep(2)
            private_redis.resume()
            for _ in range(30):
                admin.script_flush()
                await anyio.sleep(0.1)
            for key, location in zip(keys, locations, strict=True):
                response = await final(c, location, timeout=60, through_503=True)
                assert response.json() == {"marked": key}
            with anyio.fail_after(20):
                while admin.zcard("unacked_index") or admin.llen("celery"):
                    await anyio.sleep(0.05)
        finally:
            private_redis.resume()
            worker.stop()
    assert all(runs(private_redis, key) >= 1 for key in keys)
    log = (tmp_path / "w.log").read_text()
    # kombu's own refresh of its bindings logs the NOSCRIPT it meets, and tries again.
    assert "async_task_middleware/" not in log
    assert " raised unexpected" not in log
