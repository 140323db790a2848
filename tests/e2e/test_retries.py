"""A route's retries (``Route(retries=Retry(...))``): transient failures run again after the
backoff, counted on the broker; "retrying" shown between, with the attempt and the time of the
next; the last attempt's outcome is the task's; a DELETE during the backoff and a worker killed
then change nothing. Real workers, the probe app in process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from celery import Celery

from async_task_middleware import ConfigurationError, Retry, Route
from tests._servers import RedisServer, Worker
from tests.apps import PROBE_ROUTES, build_probe, celery_app
from tests.conftest import final, make_client, private_worker, runs, submit

pytestmark = pytest.mark.anyio

FAST = Retry(attempts=3, on=(ConnectionError,), on_status=(503,), backoff=0.5, jitter=False)


def retried(celery: Celery, policy: Retry = FAST) -> Any:
    routes = {spec: Route() for spec in PROBE_ROUTES}
    routes["POST /flaky"] = Route(retries=policy)
    return build_probe(celery, routes=routes)


@pytest.fixture
async def client(worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    app = retried(celery_app)
    async with LifespanManager(app), make_client(app) as http:
        yield http


async def statuses_until_final(
    client: httpx.AsyncClient, location: str
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """The final answer, and every 202 body seen on the way (polled every 20 ms)."""
    seen = []
    with anyio.fail_after(30):
        while (response := await client.get(location)).status_code == 202:
            seen.append(response.json())
            await anyio.sleep(0.02)
    return response, seen


@pytest.mark.parametrize("how", ["raise", "status"])
async def test_a_transient_failure_is_retried_until_it_succeeds(
    client: httpx.AsyncClient, redis_server: RedisServer, how: str
) -> None:
    key = f"flaky-{uuid.uuid4()}"
    location = await submit(client, f"/flaky?key={key}&fail=2&how={how}")
    done, seen = await statuses_until_final(client, location)
    assert done.status_code == 200
    assert done.json() == {"runs": 3}
    assert runs(redis_server, key) == 3
    between = [s for s in seen if s["status"] == "retrying"]
    assert between, seen
    assert {s["attempt"] for s in between} <= {2, 3}
    assert all(s["attempts"] == 3 and s["next_attempt_at"] for s in between)


async def test_a_failure_the_policy_does_not_name_fails_at_once(
    client: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    key = f"flaky-{uuid.uuid4()}"
    location = await submit(client, f"/flaky?key={key}&fail=2&how=value")
    assert (await final(client, location)).status_code == 500
    await anyio.sleep(1.5)  # three backoffs' time: nothing runs again
    assert runs(redis_server, key) == 1


async def test_the_last_attempts_outcome_is_the_tasks(
    client: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    key = f"flaky-{uuid.uuid4()}"
    location = await submit(client, f"/flaky?key={key}&fail=10&how=status")
    answer = await final(client, location)
    assert answer.status_code == 503  # the endpoint's own answer, after the third attempt
    assert answer.json() == {"down": True}
    assert runs(redis_server, key) == 3


async def test_a_delete_during_the_backoff_runs_it_never_again(
    worker: Worker, redis_server: RedisServer
) -> None:
    slow = Retry(attempts=3, on=(ConnectionError,), backoff=3, jitter=False)
    app = retried(celery_app, slow)
    async with LifespanManager(app), make_client(app) as http:
        key = f"flaky-{uuid.uuid4()}"
        location = await submit(http, f"/flaky?key={key}&fail=5")
        with anyio.fail_after(10):
            while (await http.get(location)).json().get("status") != "retrying":
                await anyio.sleep(0.05)
        assert (await http.delete(location)).status_code == 204
        await anyio.sleep(4)  # past the backoff: the retry finds the record gone
        assert runs(redis_server, key) == 1
        assert (await http.get(location)).status_code == 404


async def test_a_worker_killed_during_the_backoff_changes_nothing(logdir: Path) -> None:
    slow = Retry(attempts=2, on=(ConnectionError,), backoff=6, jitter=False)
    env = {"ATM_TEST_VISIBILITY": "4"}
    with private_worker(logdir / "retry-kill", env) as (server, worker):
        celery = Celery("retry-kill", broker=server.url, backend=server.url)
        app = retried(celery, slow)
        async with LifespanManager(app), make_client(app) as http:
            key = f"flaky-{uuid.uuid4()}"
            location = await submit(http, f"/flaky?key={key}&fail=1")
            with anyio.fail_after(10):
                while (await http.get(location)).json().get("status") != "retrying":
                    await anyio.sleep(0.05)
            worker.kill()
            again = Worker(
                "tests.worker",
                {"REDIS_URL": server.url, "BROKER_URL": "", **env},
                logdir / "retry-kill" / "again.log",
            ).start()
            try:
                answer = await final(http, location, timeout=40)
            finally:
                again.stop()
        assert answer.status_code == 200
        assert answer.json() == {"runs": 2}
        assert runs(server, key) == 2


def test_a_policy_is_checked_at_start() -> None:
    for bad in (
        {"attempts": 0},
        {"attempts": True},
        {"on": ConnectionError},
        {"on": ("not an exception!",)},
        {"on": (int,)},
        {"on_status": (99,)},
        {"on_status": ("503",)},
        {"backoff": -1},
        {"max_backoff": "60"},
    ):
        with pytest.raises(ValueError, match="Retry"):
            Retry(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retries"):
        Route(retries={"attempts": 3})  # type: ignore[arg-type]
    forever = Retry(attempts=30, on=(ConnectionError,), backoff=3600, max_backoff=86400)
    celery = Celery("long", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")
    from async_task_middleware import AsyncTaskMiddleware
    from tests.apps import probe_app

    with pytest.raises(ConfigurationError, match="result_expires"):
        AsyncTaskMiddleware(
            probe_app, celery_app=celery, routes={"POST /x": Route(retries=forever)}
        )
