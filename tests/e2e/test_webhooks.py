"""Completion webhooks end to end: a real worker delivers to a real receiver (uvicorn on
loopback, allowed by an exact rule), every delivery verified with the ``standardwebhooks``
package; retries, timeouts, ``410``, the started and progress events, a DELETE's event, and a
refused URL that enqueues nothing."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from celery import Celery
from standardwebhooks import Webhook

from async_task_middleware import AsyncTaskMiddleware, ConfigurationError, Route, Webhooks
from tests._servers import RedisServer, Uvicorn, Worker
from tests.apps import PROBE_ROUTES, build_probe, probe_app
from tests.apps_webhooks import RECEIVED
from tests.conftest import LOCATION, final, make_client, private_worker, submit

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="module")
def hooked(logdir: Path) -> Iterator[tuple[RedisServer, Worker, str]]:
    """A private Redis, a worker that delivers webhooks, and the receiver: its base URL."""
    env = {"ATM_TEST_WEBHOOK_SECRET": SECRET}
    with private_worker(logdir / "webhooks", env, pool="threads") as (server, worker):
        receiver = Uvicorn(
            "tests.apps_webhooks:app",
            {"REDIS_URL": server.url},
            logdir / "webhooks" / "receiver.log",
        ).start()
        try:
            yield server, worker, receiver.url
        finally:
            receiver.stop()


@pytest.fixture
async def client(hooked: tuple[RedisServer, Worker, str]) -> AsyncIterator[httpx.AsyncClient]:
    server, _, receiver = hooked
    celery = Celery("hooked", broker=server.url, backend=server.url)
    app = build_probe(celery, webhooks=Webhooks(allow=[receiver + "/"]))
    async with LifespanManager(app), make_client(app) as http:
        yield http


def deliveries(url: str, task_id: str, timeout: float = 15, count: int = 1) -> list[Any]:
    """The deliveries the receiver got for ``task_id``, once there are ``count``."""
    store = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(raw) for raw in store.lrange(RECEIVED, 0, -1)]
        mine = [d for d in found if json.loads(d["body"])["data"]["task_id"] == task_id]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


async def delivery_state(client: httpx.AsyncClient, location: str, expected: str) -> str:
    """The status URL's ``webhook-delivery`` header, once it says ``expected``."""
    with anyio.fail_after(15):
        while True:
            answer = (await client.get(location)).headers.get("webhook-delivery", "")
            if answer == expected:
                return answer
            await anyio.sleep(0.05)


def verified(delivery: dict[str, Any]) -> Any:
    """The event, once its signature is checked as a receiver checks it."""
    return Webhook(SECRET).verify(delivery["body"], delivery["headers"])


async def test_a_completed_task_calls_back_signed(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    location = await submit(
        client, "/mark?key=hook-ok", headers={"webhook-url": f"{receiver}/ok?token=t0ken"}
    )
    assert (await final(client, location)).status_code == 200
    task_id = location.rsplit("/", 1)[1]
    [delivery] = deliveries(server.url, task_id)
    sent = verified(delivery)
    assert sent["type"] == "task.completed"
    assert sent["data"] == {
        "task_id": task_id,
        "location": f"http://testserver{location}",
        "route": "POST /mark",
        "status": "done",
        "http_status": 200,
    }
    assert delivery["headers"]["webhook-id"] == f"msg_{task_id}_completed"
    assert delivery["headers"]["host"] == receiver.split("//", 1)[1]
    assert delivery["path"] == "ok"
    # No result body and no request data travel with it.
    assert "marked" not in delivery["body"]
    # The owner sees how the delivery went, beside the result.
    await delivery_state(client, location, "delivered; attempts=1")


async def test_a_failing_receiver_gets_the_same_event_again_until_it_accepts(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    location = await submit(
        client, "/mark?key=hook-flaky", headers={"webhook-url": f"{receiver}/flaky"}
    )
    task_id = location.rsplit("/", 1)[1]
    got = deliveries(server.url, task_id, count=3)
    assert len(got) == 3
    assert {d["headers"]["webhook-id"] for d in got} == {f"msg_{task_id}_completed"}
    assert all(verified(d)["type"] == "task.completed" for d in got)
    time.sleep(1.5)  # delivered: no fourth attempt
    assert len(deliveries(server.url, task_id, timeout=0)) == 3
    await delivery_state(client, location, "delivered; attempts=3")


async def test_a_hanging_receiver_times_out_and_is_tried_again(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    location = await submit(
        client, "/mark?key=hook-hang", headers={"webhook-url": f"{receiver}/hang"}
    )
    task_id = location.rsplit("/", 1)[1]
    got = deliveries(server.url, task_id, count=2, timeout=20)
    assert len(got) >= 2  # the first timed out after 1 s, then it was tried again


async def test_410_gone_stops_the_retries(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    location = await submit(
        client, "/mark?key=hook-gone", headers={"webhook-url": f"{receiver}/gone"}
    )
    task_id = location.rsplit("/", 1)[1]
    assert len(deliveries(server.url, task_id)) == 1
    time.sleep(2)  # the schedule would have tried three more times by now
    assert len(deliveries(server.url, task_id, timeout=0)) == 1
    await delivery_state(client, location, "stopped; attempts=1")


async def test_started_progress_and_completed_when_asked(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    asked = {"webhook-url": f"{receiver}/ok", "webhook-events": "started, progress, completed"}
    location = await submit(client, "/burst?n=50&seconds=3", headers=asked)
    task_id = location.rsplit("/", 1)[1]
    with anyio.fail_after(3):  # while it runs, its 202 says how the last delivery went
        while "webhook" not in (running := (await client.get(location)).json()):
            await anyio.sleep(0.05)
    assert running["status"] == "running"
    assert running["webhook"]["state"] == "delivered"
    assert running["webhook"]["event"] in ("started", "progress")
    got = deliveries(server.url, task_id, count=3)
    kinds = [verified(d)["type"] for d in got]
    assert kinds.count("task.started") == 1
    assert kinds.count("task.completed") == 1
    # 50 reports at once, coalesced: one progress delivery within the second.
    assert kinds.count("task.progress") == 1
    progress = next(verified(d) for d in got if verified(d)["type"] == "task.progress")
    assert progress["data"]["status"] == "running"
    # From the event loop, a newer report replaces one not yet stored: the latest wins.
    assert progress["data"]["progress"]["of"] == 50
    assert 1 <= progress["data"]["progress"]["step"] <= 50


async def test_a_delete_before_the_end_is_a_cancelled_event(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    location = await submit(client, "/slow?seconds=30", headers={"webhook-url": f"{receiver}/ok"})
    await anyio.sleep(0.5)
    assert (await client.delete(location)).status_code == 204
    task_id = location.rsplit("/", 1)[1]
    [delivery] = deliveries(server.url, task_id)
    sent = verified(delivery)
    assert sent["type"] == "task.completed"
    assert sent["data"]["status"] == "cancelled"
    time.sleep(1)
    assert len(deliveries(server.url, task_id, timeout=0)) == 1  # the worker sent none


async def test_a_refused_webhook_enqueues_nothing(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    server, _, receiver = hooked
    store = redis.Redis.from_url(server.url)
    before = sorted(store.keys("async-task-middleware-*"))
    for url in (f"{receiver}/ok".replace("127.0.0.1", "localhost"), "http://10.0.0.1/", "x"):
        response = await client.post("/mark?key=never", headers={"webhook-url": url})
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == "urn:async-task-middleware:problem:bad-webhook"
        assert url not in response.text
    assert sorted(store.keys("async-task-middleware-*")) == before
    assert store.get("never") is None


async def test_a_worker_killed_with_the_delivery_in_hand_still_calls_back(
    hooked: tuple[RedisServer, Worker, str], logdir: Path
) -> None:
    """The worker that ran the task is SIGKILLed while its delivery waits for the receiver;
    another worker, started after, delivers the same event."""
    _, _, receiver = hooked
    env = {
        "ATM_TEST_WEBHOOK_SECRET": SECRET,
        "ATM_TEST_VISIBILITY": "4",  # a dead worker's messages come back after 4 s
    }
    with private_worker(logdir / "webhooks-kill", env, pool="threads") as (server, worker):
        celery = Celery("killed", broker=server.url, backend=server.url)
        app = build_probe(celery, webhooks=Webhooks(allow=[receiver + "/"]))
        async with LifespanManager(app), make_client(app) as client:
            headers = {"webhook-url": f"{receiver}/hang-once"}
            location = await submit(client, "/mark?key=hook-kill", headers=headers)
            assert (await final(client, location)).status_code == 200
        task_id = location.rsplit("/", 1)[1]
        # The receiver's Redis is the module's; the first attempt is in the receiver now.
        receiver_redis = hooked[0].url
        assert len(deliveries(receiver_redis, task_id)) == 1
        worker.kill()
        again = Worker(
            "tests.worker",
            {"REDIS_URL": server.url, "BROKER_URL": "", **env},
            logdir / "webhooks-kill" / "worker-again.log",
            pool="threads",
        ).start()
        try:
            got = deliveries(receiver_redis, task_id, count=2, timeout=30)
        finally:
            again.stop()
    assert len(got) >= 2
    assert {d["headers"]["webhook-id"] for d in got} == {f"msg_{task_id}_completed"}
    assert all(verified(d)["data"]["status"] == "done" for d in got)


async def test_the_client_submits_with_a_webhook_and_returns_at_once(
    client: httpx.AsyncClient, hooked: tuple[RedisServer, Worker, str]
) -> None:
    from async_task_middleware.client import submit_task

    server, _, receiver = hooked
    location = await submit_task(
        client,
        "POST",
        "/mark?key=hook-client",
        webhook=f"{receiver}/ok",
        webhook_events="completed",
    )
    assert LOCATION.match(urlsplit(location).path)
    task_id = location.rsplit("/", 1)[1]
    [delivery] = deliveries(server.url, task_id)
    assert verified(delivery)["data"]["status"] == "done"
    with pytest.raises(httpx.HTTPStatusError):
        await submit_task(client, "POST", "/mark?key=never", webhook="http://10.0.0.1/")


async def test_a_route_of_its_own_webhook_calls_back_without_the_header(
    hooked: tuple[RedisServer, Worker, str],
) -> None:
    server, _, receiver = hooked
    celery = Celery("route-hook", broker=server.url, backend=server.url)
    routes = {spec: Route() for spec in PROBE_ROUTES}
    routes["POST /mark"] = Route(webhook=f"{receiver}/ok?from=route")
    routes["POST /echo"] = Route(webhook="http://10.0.0.1/")  # not allowed by the rules
    app = build_probe(celery, routes=routes, webhooks=Webhooks(allow=[receiver + "/"]))
    async with LifespanManager(app), make_client(app) as http:
        location = await submit(http, "/mark?key=hook-route")
        task_id = location.rsplit("/", 1)[1]
        [delivery] = deliveries(server.url, task_id)
        assert verified(delivery)["data"]["route"] == "POST /mark"
        refused = await http.post("/echo", content=b"x")
        assert refused.status_code == 503  # the operator's to fix, not the caller's


def test_a_route_webhook_needs_the_middlewares_webhooks() -> None:
    celery = Celery("no-hooks", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")
    routes = {"POST /mark": Route(webhook="https://hooks.example/")}
    with pytest.raises(ConfigurationError, match="webhooks="):
        AsyncTaskMiddleware(probe_app, celery_app=celery, routes=routes)
    for hostile in ("ftp://hooks.example/", "https://hooks.example/\n", "x" * 3000, 5):
        with pytest.raises(ValueError, match="webhook"):
            Route(webhook=hostile)  # type: ignore[arg-type]
    for events in ("", "done", "completed,\u00e9", "x" * 5000):
        with pytest.raises(ValueError, match="webhook_events"):
            Route(webhook="https://hooks.example/", webhook_events=events)


async def test_on_rabbitmq_the_events_are_published_after_the_outcome(
    hooked: tuple[RedisServer, Worker, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    """RabbitMQ as the broker (the end-of-task script cannot reach it): the completed event is
    published right after the outcome, a DELETE's from the web side. Queues of the test's own,
    deleted afterwards."""
    from kombu import Connection

    from tests.faults.suite import RABBITMQ_URL, rabbitmq_up

    if not rabbitmq_up():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    _, _, receiver = hooked
    replays, hooks = f"replays-{uuid.uuid4().hex}", f"hooks-{uuid.uuid4().hex}"
    env = {
        "REDIS_URL": private_redis.url,
        "BROKER_URL": RABBITMQ_URL,
        "ATM_TEST_WEBHOOK_SECRET": SECRET,
        "ATM_TEST_WEBHOOK_QUEUE": hooks,
    }
    worker = Worker("tests.worker", env, tmp_path / "worker.log", pool="threads", queues=replays)
    worker.start()
    celery = Celery("hooked-amqp", broker=RABBITMQ_URL, backend=private_redis.url)
    celery.conf.update(
        task_default_queue=replays, broker_transport_options={"confirm_publish": True}
    )
    app = build_probe(celery, webhooks=Webhooks(allow=[receiver + "/"], queue=hooks))
    try:
        async with LifespanManager(app), make_client(app) as http:
            headers = {"webhook-url": f"{receiver}/ok"}
            done = await submit(http, "/mark?key=hook-amqp", headers=headers)
            cancelled = await submit(http, "/slow?seconds=30", headers=headers)
            assert (await final(http, done)).status_code == 200
            assert (await http.delete(cancelled)).status_code == 204
        receiver_redis = hooked[0].url
        [finished] = deliveries(receiver_redis, done.rsplit("/", 1)[1])
        assert verified(finished)["data"]["status"] == "done"
        [gone] = deliveries(receiver_redis, cancelled.rsplit("/", 1)[1])
        assert verified(gone)["data"]["status"] == "cancelled"
    finally:
        worker.stop()
        with Connection(RABBITMQ_URL) as connection:
            channel = connection.channel()
            for queue in (replays, hooks):
                channel.queue_delete(queue)
