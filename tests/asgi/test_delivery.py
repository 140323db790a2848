"""Nothing lost: worker deaths, time limits, cancellation while no worker is up, expiry, broker
restarts. Each case runs real processes: Redis, Celery workers, and kills them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from celery import Celery

from async_task_middleware import ConfigurationError, register_replay
from tests._servers import ROOT, RedisServer, Worker, free_port, wait_for
from tests.apps import build_probe
from tests.conftest import final, make_client, private_worker, submit

pytestmark = pytest.mark.anyio

TIME_LIMIT = 2
EXPIRES = 4


def runs(url: str, key: str) -> int:
    return int(redis.Redis.from_url(url).get(key) or 0)


async def test_poison_request_fails_after_max_attempts(
    probe: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    """A request that kills its worker process every time: re-delivered, then failed."""
    key = f"die-{uuid.uuid4()}"
    response = await final(probe, await submit(probe, f"/die?key={key}"), timeout=60)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert runs(redis_server.url, key) == 2  # tests/worker.py: max_attempts=2


# -- a Redis and a worker of this module's own, with short limits, stopped and restarted ------


@pytest.fixture(scope="module")
def own_redis_and_worker(logdir: Path) -> Iterator[tuple[RedisServer, Worker]]:
    env = {"ATM_TEST_TIME_LIMIT": str(TIME_LIMIT), "ATM_TEST_RESULT_EXPIRES": str(EXPIRES)}
    with private_worker(logdir / "delivery", env) as servers:
        yield servers


@pytest.fixture(scope="module")
def own_redis(own_redis_and_worker: tuple[RedisServer, Worker]) -> RedisServer:
    return own_redis_and_worker[0]


@pytest.fixture(scope="module")
def own_worker(own_redis_and_worker: tuple[RedisServer, Worker]) -> Worker:
    return own_redis_and_worker[1]


@pytest.fixture
async def own(own_worker: Worker, own_redis: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    celery = Celery("own", broker=own_redis.url, backend=own_redis.url)
    celery.conf.update(result_expires=EXPIRES)
    app = build_probe(celery)
    async with LifespanManager(app), make_client(app) as client:
        yield client


async def test_time_limit_fails_the_task(own: httpx.AsyncClient) -> None:
    started = anyio.current_time()
    response = await final(own, await submit(own, "/slow?seconds=30"), timeout=20)
    assert response.status_code == 500
    assert anyio.current_time() - started < 15


async def test_record_and_result_expire_together(
    own: httpx.AsyncClient, own_redis: RedisServer
) -> None:
    location = await submit(own, "/echo", content=b"short-lived")
    assert (await final(own, location)).status_code == 200
    task_id = location.rsplit("/", 1)[1]
    client = redis.Redis.from_url(own_redis.url)
    assert client.ttl(f"async-task-middleware-{task_id}") <= EXPIRES
    assert 0 < client.ttl(f"celery-task-meta-{task_id}") <= EXPIRES
    await anyio.sleep(EXPIRES + 1)
    assert (await own.get(location)).status_code == 404
    assert client.exists(f"async-task-middleware-{task_id}", f"celery-task-meta-{task_id}") == 0


async def test_cancelled_while_no_worker_was_up_never_runs(
    own: httpx.AsyncClient, own_worker: Worker, own_redis: RedisServer
) -> None:
    key = f"offline-{uuid.uuid4()}"
    own_worker.stop()
    try:
        location = await submit(own, f"/mark?key={key}")
        assert (await own.get(location)).json()["status"] == "queued"
        assert (await own.delete(location)).status_code == 204
    finally:
        own_worker.start()
    control = await submit(own, f"/mark?key={key}-control")
    assert (await final(own, control)).status_code == 200
    assert runs(own_redis.url, f"{key}-control") == 1
    assert runs(own_redis.url, key) == 0
    assert (await own.get(location)).status_code == 404


async def test_worker_reconnects_after_redis_restart(
    own: httpx.AsyncClient, own_redis: RedisServer
) -> None:
    assert (await final(own, await submit(own, "/echo", content=b"before"))).status_code == 200
    own_redis.stop()
    own_redis.start()
    with anyio.fail_after(30):
        while True:
            response = await own.post("/echo", content=b"after")
            if response.status_code == 303:
                break
            assert response.status_code == 503
            await anyio.sleep(0.2)
    assert (await final(own, response.headers["location"], timeout=60)).status_code == 200


# -- refusing to start ----------------------------------------------------------------------


def test_time_limit_above_visibility_timeout_refused_without_leases() -> None:
    def celery() -> Celery:
        app = Celery("t", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")
        app.conf.broker_transport_options = {"visibility_timeout": 60}
        return app

    with pytest.raises(ConfigurationError, match="visibility_timeout") as refused:
        register_replay(celery(), {"default": "x:y"}, time_limit=50, leases=False)
    assert "time_limit" in str(refused.value)
    register_replay(celery(), {"default": "x:y"}, time_limit=49, leases=False)
    # Leases renew a running task's claim: any length is safe.
    register_replay(celery(), {"default": "x:y"}, time_limit=3600)


def test_time_limit_above_rabbitmq_consumer_timeout_refused() -> None:
    celery = Celery("t", broker="amqp://guest:guest@127.0.0.1:1//", backend="redis://x/0")
    celery.conf.broker_transport_options = {"confirm_publish": True}
    with pytest.raises(ConfigurationError, match="consumer_timeout"):
        register_replay(celery, {"default": "x:y"}, time_limit=1800)


def test_amqp_without_publisher_confirms_refused() -> None:
    celery = Celery("t", broker="amqp://guest:guest@127.0.0.1:5672//", backend="redis://x/0")
    with pytest.raises(ConfigurationError, match="confirm_publish"):
        register_replay(celery, {"default": "x:y"})


def refused_worker(**env: str) -> str:
    """Start ``celery -A tests.worker worker`` with ``env``; assert it refuses to start and
    return what it said."""
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.worker", "worker"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "BROKER_URL": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    return result.stderr + result.stdout


def test_worker_process_refuses_to_start() -> None:
    """The same check, as a user meets it: ``celery worker`` exits and says what to change."""
    said = refused_worker(ATM_TEST_TIME_LIMIT="3600", ATM_TEST_LEASES="0")
    assert "visibility_timeout" in said


def test_settings_are_checked_where_the_worker_starts() -> None:
    """A setting changed after ``register_replay`` (here, requests copied into results) still
    stops the worker, at its start."""
    assert "result_extended" in refused_worker(ATM_TEST_LATE_EXTENDED="1")


def test_the_defaults_fit_rabbitmq() -> None:
    """With no time limit set, a RabbitMQ broker is accepted as it comes."""
    celery = Celery("t", broker="amqp://guest:guest@127.0.0.1:1//", backend="redis://x/0")
    celery.conf.broker_transport_options = {"confirm_publish": True}
    register_replay(celery, {"default": "x:y"})


async def test_a_message_redis_dropped_in_kombus_gap_is_pushed_again(logdir: Path) -> None:
    """kombu BRPOPs a message, then Redis dies before kombu records it as unacknowledged: the
    message is in neither place. Here the pop is made by hand, Redis is SIGKILLed and
    restarted from its append-only file, and a worker started afterwards finds the task
    missing (twice), pushes its kept copy again and runs it; the other tasks run once."""

    def restart(server: RedisServer, celery: Celery) -> None:
        server.kill()
        server.start()

    await _popped_then_found(logdir, "gap", restart, persistent=True)


async def test_a_message_a_killed_worker_took_is_pushed_again(logdir: Path) -> None:
    """kombu BRPOPs a message, then its worker is killed before kombu records it as
    unacknowledged: Redis keeps it nowhere, and Redis did not restart. Here the pop is made by
    hand, after a sweep of this Redis; the worker started in place of the killed one finds the
    task missing (twice), pushes its kept copy again and runs it; the other tasks run once."""
    from async_task_middleware._shared.binding import Binding

    def swept_before(server: RedisServer, celery: Celery) -> None:
        # As an earlier worker's sweep left it: this Redis has not changed since.
        with redis.Redis.from_url(server.url) as store:
            run_id = store.info("server")["run_id"]
            store.set(Binding.of(celery).record_prefix + b"redis-run", run_id)

    await _popped_then_found(logdir, "killed", swept_before)


async def test_a_message_a_worker_killed_beside_a_live_one_took_is_pushed_again(
    logdir: Path,
) -> None:
    """As above, but no worker is started in the killed one's place: the worker that stayed
    up, which swept where it started, finds the killed one silent for ``DEAD_AFTER`` in the
    set of live workers, sweeps again, pushes the task and runs it."""
    from async_task_middleware._shared.binding import Binding

    def killed_beside(server: RedisServer, celery: Celery) -> None:
        with redis.Redis.from_url(server.url) as store:
            # The killed worker's entry as it leaves it: last heard from long ago.
            store.zadd(Binding.of(celery).record_prefix + b"workers", {"killed": 0})

    await _popped_then_found(logdir, "beside", killed_beside, worker_first=True)


async def _popped_then_found(
    logdir: Path,
    name: str,
    then: Callable[[RedisServer, Celery], None],
    persistent: bool = False,
    worker_first: bool = False,
) -> None:
    """Five submissions; the first one's message popped by hand (kombu's BRPOP), ``then``
    done; a worker started afterwards (or, ``worker_first``, one started before, paused after
    its first sweep and resumed) runs every task once and says it pushed one again."""
    from async_task_middleware._shared.binding import Binding

    with RedisServer(logdir / f"{name}-redis", persistent=persistent) as server:
        celery = Celery(name, broker=server.url, backend=server.url)
        app = build_probe(celery)
        log = logdir / f"{name}.log"
        port = free_port()
        env = {"REDIS_URL": server.url, "BROKER_URL": "", "ATM_TEST_METRICS_PORT": str(port)}
        worker = Worker("tests.worker", env, log)
        try:
            if worker_first:
                worker.start()
                with redis.Redis.from_url(server.url) as store:
                    prefix = Binding.of(celery).record_prefix
                    swept, sweeping = prefix + b"redis-run", prefix + b"sweeping"
                    # Its end, not only its record: paused between the two, the sweep would
                    # go on, once resumed, to forget the killed worker added meanwhile.
                    wait_for(
                        lambda: store.exists(swept) and not store.exists(sweeping),
                        30,
                        "the first sweep",
                    )
                worker.pause()
                # Its BRPOP (1 s) times out: what is submitted now stays in the queue.
                await anyio.sleep(2.5)
            keys = [f"{name}-{uuid.uuid4()}" for _ in range(5)]
            async with LifespanManager(app), make_client(app) as client:
                locations = [await submit(client, f"/mark?key={key}") for key in keys]
            with redis.Redis.from_url(server.url) as store:
                popped = store.rpop("celery")  # the oldest: the first submission's message
                assert popped is not None
                assert keys[0] in popped.decode()  # in the query string the message carries
                assert store.llen("celery") == 4
            then(server, celery)
            if worker_first:
                worker.resume()
            else:
                worker.start()
            async with LifespanManager(app), make_client(app) as client:
                for location in locations:
                    assert (await final(client, location, timeout=60)).status_code == 200
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        finally:
            worker.stop()
        for key in keys:
            assert runs(server.url, key) == 1
        assert "1 tasks lost by the broker" in log.read_text()
        assert "\nasync_task_middleware_pushed_again_total 1.0\n" in metrics


async def test_the_sweep_finds_the_copies_among_a_large_database_in_few_steps(
    logdir: Path,
) -> None:
    """Where a worker starts, the sweep finds the kept copies among every key of the database (a
    day's results and records): a few ``SCAN`` steps of a thousand keys each, not a round trip
    per ten keys (Redis's default step); and what it finds is right."""
    from async_task_middleware._shared.binding import Binding
    from async_task_middleware._worker.sweep import Sweeper

    with RedisServer(logdir / "sweep-scan-redis") as server:
        celery = Celery("sweep", broker=server.url, backend=server.url)
        app = build_probe(celery)
        async with LifespanManager(app), make_client(app) as client:
            locations = [await submit(client, "/slow?seconds=0") for _ in range(3)]
        store = redis.Redis.from_url(server.url)
        pipe = store.pipeline(transaction=False)
        for n in range(50_000):
            pipe.set(f"celery-task-meta-{n}", b"{}")
        pipe.execute()
        store.rpop("celery")  # the oldest message, dropped as a killed Redis would
        store.config_resetstat()
        sweeper = Sweeper(celery, Binding.of(celery))
        assert sweeper.missing() == {locations[0].rsplit("/", 1)[-1]}
        scans = store.info("commandstats")["cmdstat_scan"]["calls"]
        assert scans <= 100, f"{scans} SCAN steps for {store.dbsize()} keys"
        sweeper.stop()
        store.close()


async def test_the_sweep_leaves_queued_and_unacked_messages_alone(logdir: Path) -> None:
    """The sweep pushes nothing again when every message is where kombu keeps it: waiting in
    the queue, or unacknowledged."""
    from async_task_middleware._shared.binding import Binding
    from async_task_middleware._worker.sweep import Sweeper

    with RedisServer(logdir / "sweep-redis") as server:
        celery = Celery("sweep", broker=server.url, backend=server.url)
        app = build_probe(celery)
        async with LifespanManager(app), make_client(app) as client:
            for _ in range(3):
                await submit(client, "/slow?seconds=0")
        store = redis.Redis.from_url(server.url)
        # One message as kombu holds it once delivered: out of the queue, in the hash.
        message = store.rpop("celery")
        store.hset("unacked", "tag", f'[{message.decode()}, "", "celery"]')
        sweeper = Sweeper(celery, Binding.of(celery))
        assert sweeper.missing() == set()
        assert sweeper.sweep_if_due() == 0
        assert sweeper.sweep_if_due() is None  # the same Redis: no sweep again
        # A worker silent for DEAD_AFTER (killed): swept for, then out of the set of workers.
        workers = Binding.of(celery).record_prefix + b"workers"
        store.zadd(workers, {"killed": 0})
        assert sweeper.sweep_if_due() == 0
        assert store.zscore(workers, "killed") is None
        assert store.zcard(workers) == 1  # this sweeper itself
        assert sweeper.sweep_if_due() is None
        assert store.llen("celery") == 2
        # The message gone from the hash too (dropped): it is missing now.
        store.delete("unacked")
        assert len(sweeper.missing()) == 1
        # A worker stopping between the two looks pushes nothing on one look alone.
        stopping = Sweeper(celery, Binding.of(celery))
        stopping.stop()
        assert stopping.sweep_if_due() is None
        sweeper.stop()
        assert store.zcard(workers) == 0  # stopped, not killed: neither is taken for silent
        assert store.llen("celery") == 2
        store.close()
