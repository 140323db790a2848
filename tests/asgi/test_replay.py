"""What the replay sees and keeps, on the probe app, with a real Redis and a real worker."""

from __future__ import annotations

import base64
import os
import uuid

import anyio
import httpx
import pytest
import redis.asyncio
from asgi_lifespan import LifespanManager

from tests.conftest import final, make_client, submit

pytestmark = pytest.mark.anyio


async def redis_get(key: str) -> bytes | None:
    client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
    try:
        value: bytes | None = await client.get(key)
        return value
    finally:
        await client.aclose()


async def test_replay_sees_the_request_as_sent(probe: httpx.AsyncClient) -> None:
    location = await submit(
        probe,
        "/items/42?a=1&a=2&b=%20x",
        content=b"\x00binary\xffbody",
        headers=[("x-dup", "one"), ("x-dup", "two"), ("content-type", "application/octet-stream")],
    )
    assert location.startswith("/items/42/")
    seen = (await final(probe, location)).json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/items/42"
    assert seen["query_string"] == "a=1&a=2&b=%20x"
    assert base64.b64decode(seen["body"]) == b"\x00binary\xffbody"
    assert [v for k, v in seen["headers"] if k == "x-dup"] == ["one", "two"]
    assert seen["path_params"] == {"item_id": 42}
    assert seen["scheme"] == "http"
    assert seen["client"] == ["127.0.0.1", 123]  # httpx's ASGITransport default
    assert seen["server"] is None or seen["server"][0] == "testserver"


async def test_repeated_response_headers_kept_hop_by_hop_dropped(probe: httpx.AsyncClient) -> None:
    response = await final(probe, await submit(probe, "/cookies"))
    assert response.status_code == 200
    assert response.content == b"two cookies"
    assert response.headers.get_list("set-cookie") == [
        "a=1; Path=/; SameSite=lax",
        "b=2; Path=/; SameSite=lax",
    ]
    assert response.headers.get_list("x-repeated") == ["one", "two"]
    assert "connection" not in response.headers


async def test_lifespan_state_in_the_worker(probe: httpx.AsyncClient) -> None:
    bodies = [(await final(probe, await submit(probe, "/state"))).json() for _ in range(6)]
    assert {b["greeting"] for b in bodies} == {"hello from lifespan"}
    # The lifespan ran once per worker process, not once per task.
    assert {b["startups"] for b in bodies} == {1}
    assert all(b["pid"] != os.getpid() for b in bodies)


async def test_failure_is_500_problem_without_internals(probe: httpx.AsyncClient) -> None:
    response = await final(probe, await submit(probe, "/boom"))
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 500
    assert problem["title"]
    assert problem["type"]
    assert problem["instance"].startswith("/boom/")
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert "/srv" not in response.text
    assert "RuntimeError" not in response.text


async def test_endpoint_own_404_is_replayed(probe: httpx.AsyncClient) -> None:
    response = await final(probe, await submit(probe, "/notfound"))
    assert response.status_code == 404
    assert response.json() == {"detail": "no such thing"}


async def test_background_task_finishes_before_the_result(probe: httpx.AsyncClient) -> None:
    key = f"bg-{uuid.uuid4()}"
    response = await final(probe, await submit(probe, f"/background?key={key}"))
    assert response.status_code == 200
    assert await redis_get(key) == b"1"


async def test_202_while_running_with_progress(probe: httpx.AsyncClient) -> None:
    location = await submit(probe, "/progress?seconds=3")
    seen: set[str] = set()
    with anyio.fail_after(10):
        while True:
            response = await probe.get(location)
            if response.status_code != 202:
                break
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["retry-after"] == "1"
            body = response.json()
            assert body["task_id"] == location.rsplit("/", 1)[1]
            assert body["status"] in ("queued", "running")
            seen.add(body["status"])
            if body["progress"] is not None:
                assert body["progress"] == {"step": 1, "of": 2}
                seen.add("progress")
            await anyio.sleep(0.1)
    assert response.status_code == 200
    assert {"running", "progress"} <= seen


async def test_delete_queued_task_never_runs(probe: httpx.AsyncClient) -> None:
    # Two slow tasks occupy both worker processes; the third waits in the queue.
    busy = [await submit(probe, "/slow?seconds=2") for _ in range(2)]
    await anyio.sleep(0.5)
    key = f"mark-{uuid.uuid4()}"
    queued = await submit(probe, f"/mark?key={key}")
    status = await probe.get(queued)
    assert status.status_code == 202
    assert status.json()["status"] == "queued"
    assert (await probe.delete(queued)).status_code == 204
    assert (await probe.get(queued)).status_code == 404
    for location in busy:
        assert (await final(probe, location)).status_code == 200
    # Give the worker time to take the cancelled message, then check it did not run.
    control = await submit(probe, f"/mark?key={key}-control")
    assert (await final(probe, control)).status_code == 200
    assert await redis_get(f"{key}-control") == b"1"
    assert await redis_get(key) is None
    assert (await probe.get(queued)).status_code == 404


async def test_delete_running_task_stops_it(probe: httpx.AsyncClient) -> None:
    key = f"mark-{uuid.uuid4()}"
    location = await submit(probe, f"/mark?key={key}&seconds=2")
    with anyio.fail_after(10):
        while (await probe.get(location)).json()["status"] != "running":
            await anyio.sleep(0.05)
    assert (await probe.delete(location)).status_code == 204
    await anyio.sleep(3)
    assert await redis_get(key) is None
    assert (await probe.get(location)).status_code == 404


async def test_delete_stops_a_def_endpoint_at_its_next_progress_report(
    probe: httpx.AsyncClient,
) -> None:
    """A ``def`` endpoint runs in a thread no one can stop from outside: deleted, it stops
    where it next reports progress (``TaskCancelled``), and nothing of it is kept."""
    key = f"steps-{uuid.uuid4()}"
    location = await submit(probe, f"/steps?key={key}&steps=100")
    with anyio.fail_after(10):
        while int(await redis_get(key) or 0) < 3:
            await anyio.sleep(0.05)
    assert (await probe.delete(location)).status_code == 204
    await anyio.sleep(1.5)  # the beater notices within cancel_check_interval (0.5 s)
    stopped_at = int(await redis_get(key) or 0)
    await anyio.sleep(1.0)
    assert int(await redis_get(key) or 0) == stopped_at < 30
    assert (await probe.get(location)).status_code == 404
    task_id = location.rsplit("/", 1)[1]
    client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
    try:
        # The report after the delete wrote no progress back.
        assert await client.exists(f"celery-task-meta-{task_id}") == 0
    finally:
        await client.aclose()


async def test_the_served_app_may_be_registered_around_a_mount(worker: object) -> None:
    """The worker has the app the server serves (a ``Mount("/api", ...)`` around the one the
    middleware sits in): the replay still reaches the endpoint, with the mount's scope."""
    from tests.apps import served_mount_app

    async with LifespanManager(served_mount_app), make_client(served_mount_app) as client:
        location = await submit(client, "/api/echo", content=b"around")
        done = await final(client, location)
        assert done.status_code == 200, done.text
        seen = done.json()
        assert (seen["path"], seen["root_path"]) == ("/api/echo", "/api")
        assert base64.b64decode(seen["body"]) == b"around"


async def test_the_app_the_middleware_wraps_may_be_registered(worker: object) -> None:
    from tests.apps import wrapped_app

    async with LifespanManager(wrapped_app), make_client(wrapped_app) as client:
        done = await final(client, await submit(client, "/echo", content=b"inside"))
        assert done.status_code == 200, done.text
        assert base64.b64decode(done.json()["body"]) == b"inside"


async def test_an_app_registered_without_the_middleware_is_a_clear_error(
    worker: object,
) -> None:
    from tests.apps import misregistered_app

    async with LifespanManager(misregistered_app), make_client(misregistered_app) as client:
        done = await final(client, await submit(client, "/echo", content=b"x"))
        assert done.status_code == 500
        assert "never reached the middleware named 'misregistered'" in done.json()["detail"]


async def test_root_path_and_mount(worker: object) -> None:
    from tests.apps import mounted_app

    async with LifespanManager(mounted_app), make_client(mounted_app) as client:
        location = await submit(client, "/api/echo", content=b"mounted")
        assert location.startswith("/api/echo/")
        seen = (await final(client, location)).json()
        assert seen["path"] == "/api/echo"
        assert seen["root_path"] == "/api"
        assert base64.b64decode(seen["body"]) == b"mounted"
        assert (await client.get("/api/health")).json() == {"ok": True}

    from tests.apps import probe_app

    # A server-level root_path (uvicorn --root-path, a proxy prefix).
    async with LifespanManager(probe_app), make_client(probe_app, root_path="/prefix") as client:
        location = await submit(client, "/prefix/echo", content=b"x")
        assert location.startswith("/prefix/echo/")
        assert (await final(client, location)).status_code == 200


async def test_delete_racing_completion_never_reappears(probe: httpx.AsyncClient) -> None:
    """DELETE around the moment the replay ends: one state wins, a deleted task stays gone."""
    for delay in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45):
        location = await submit(probe, "/slow?seconds=0.3")
        await anyio.sleep(delay)
        assert (await probe.delete(location)).status_code == 204
        for _ in range(8):
            assert (await probe.get(location)).status_code == 404
            await anyio.sleep(0.1)
