"""Observability: the metrics, scraped as an operator would (the web side's from the default
registry, the worker's from its own endpoint: a threads-pool worker runs its replays in its one
process), and the request id in the worker's log lines."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import prometheus_client
import pytest
from asgi_lifespan import LifespanManager

from tests._servers import RedisServer, Worker, free_port
from tests.conftest import final, make_client, private_worker, submit

pytestmark = pytest.mark.anyio


def sample(name: str, **labels: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_the_web_side_counts_answers_and_waiters(worker: object) -> None:
    from tests.apps import probe_app

    route = "POST /slow"
    before_303 = sample("async_task_middleware_submissions_total", route=route, answer="303")
    before_413 = sample("async_task_middleware_submissions_total", route=route, answer="413")
    async with LifespanManager(probe_app), make_client(probe_app) as client:
        location = await submit(client, "/slow?seconds=1.5")
        big = b"x" * (10 * 1024 * 1024 + 1)
        assert (await client.post("/slow", content=big)).status_code == 413
        held: list[float] = []

        async def watch() -> None:
            await anyio.sleep(0.5)
            held.append(sample("async_task_middleware_waiters"))

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            done = await client.get(location, headers={"prefer": "wait=10"})
        assert done.status_code == 200
    after = sample("async_task_middleware_submissions_total", route=route, answer="303")
    assert after == before_303 + 1
    after = sample("async_task_middleware_submissions_total", route=route, answer="413")
    assert after == before_413 + 1
    assert held == [1.0]
    assert sample("async_task_middleware_waiters") == 0.0


@pytest.fixture(scope="module")
def metered_worker(logdir: Path) -> Iterator[tuple[RedisServer, int]]:
    port = free_port()
    env = {"ATM_TEST_METRICS_PORT": str(port)}
    with private_worker(logdir / "metrics", env, pool="threads") as (server, _):
        yield server, port


async def test_the_worker_times_queue_waits_and_replays(
    metered_worker: tuple[RedisServer, int],
) -> None:
    from celery import Celery

    from tests.apps import build_probe

    server, port = metered_worker
    app = build_probe(Celery("metered", broker=server.url, backend=server.url))
    async with LifespanManager(app), make_client(app) as client:
        ok = await final(client, await submit(client, "/echo", content=uuid.uuid4().bytes))
        failed = await final(client, await submit(client, "/boom"))
    assert (ok.status_code, failed.status_code) == (200, 500)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    replays = "async_task_middleware_replay_seconds_count"
    assert f'{replays}{{outcome="200",route="POST /echo"}} 1.0' in text
    assert f'{replays}{{outcome="failed",route="POST /boom"}} 1.0' in text
    assert 'async_task_middleware_queue_wait_seconds_count{route="POST /echo"} 1.0' in text


async def test_the_request_id_joins_the_web_and_worker_logs(
    metered_worker: tuple[RedisServer, int], logdir: Path
) -> None:
    """``X-Request-ID`` (or a ``traceparent``'s trace id) is in the worker's INFO lines for
    the replay, beside the task id; the replay itself sees the header as sent."""
    from celery import Celery

    from tests.apps import build_probe

    server, _ = metered_worker
    app = build_probe(Celery("logged", broker=server.url, backend=server.url))
    trace_id = uuid.uuid4().hex
    sent = {
        "x-request-id": f"req-{uuid.uuid4().hex[:12]}",
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
    }
    cases = ((sent, sent["x-request-id"]), ({"traceparent": sent["traceparent"]}, trace_id))
    async with LifespanManager(app), make_client(app) as client:
        for headers, expected in cases:
            location = await submit(client, "/echo", content=b"x", headers=headers)
            done = await final(client, location)
            name, value = next(iter(headers.items()))
            assert dict(done.json()["headers"]).get(name) == value
            task_id = location.rsplit("/", 1)[1]

            def logged(event: str, task_id: str = task_id, expected: str = expected) -> bool:
                # The worker logs "finished" just after storing the result: it may trail the 200.
                log = (logdir / "metrics" / "worker.log").read_text()
                lines = [line for line in log.splitlines() if task_id in line]
                return any(event in line and expected in line for line in lines)

            with anyio.fail_after(10):
                while not logged("finished: POST /echo 200 in"):
                    await anyio.sleep(0.1)


RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_listens() -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", 5672)) == 0


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo", "replay"])
async def test_every_line_of_a_replay_reaches_the_workers_log(
    private_redis: RedisServer, tmp_path: Path, pool: str, broker: str
) -> None:
    """An app that takes over logging as it loads (as Litestar does) leaves the worker's own:
    each replay's "started" and "finished" lines, Celery's "succeeded" and the endpoint's own
    line all reach the log, on every pool and both brokers. On RabbitMQ the test has a queue
    of its own, deleted afterwards."""
    from celery import Celery
    from kombu import Connection
    from starlette.applications import Starlette

    from async_task_middleware import AsyncTaskMiddleware

    if broker == "amqp" and not _rabbitmq_listens():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    queue = f"logs-{uuid.uuid4().hex}"
    broker_url = private_redis.url if broker == "redis" else RABBITMQ_URL
    env = {"REDIS_URL": private_redis.url, "BROKER_URL": broker_url}
    log = tmp_path / "worker.log"
    worker = Worker("tests.worker", env, log, 2, pool, queues=queue).start()
    celery = Celery("logs", broker=broker_url, backend=private_redis.url)
    celery.conf.update(task_default_queue=queue, broker_transport_options={"confirm_publish": True})
    app = AsyncTaskMiddleware(
        Starlette(), celery_app=celery, routes=["POST /log"], name="takes-logging"
    )
    keys = [uuid.uuid4().hex for _ in range(6)]
    try:
        async with LifespanManager(app), make_client(app) as client:
            locations = [await submit(client, f"/log?key={key}") for key in keys]
            for location in locations:
                assert (await final(client, location)).status_code == 200

            def missing() -> list[str]:
                text = log.read_text()
                lines = text.splitlines()
                absent = [f"endpoint line {key}" for key in keys if key not in text]
                for location in locations:
                    task_id = location.rsplit("/", 1)[1]
                    mine = [line for line in lines if task_id in line]
                    for event in (" started: POST /log", " finished: POST /log 200", "succeeded"):
                        if not any(event in line for line in mine):
                            absent.append(f"{task_id}{event}")
                return absent

            with anyio.move_on_after(10):
                while missing():
                    await anyio.sleep(0.1)
            assert not missing(), missing()
    finally:
        worker.stop()
        celery.close()  # its broker connections
        if broker == "amqp":
            with Connection(RABBITMQ_URL) as conn:
                conn.default_channel.queue_delete(queue)
