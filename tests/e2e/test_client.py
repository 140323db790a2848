"""The client and its command line against the served FastAPI example (uvicorn, the example's
worker, a Redis of their own), and against the probe app for a task that outlives its caller."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from async_task_middleware.client import TaskTimeout, run_task, run_task_sync
from tests.conftest import LOCATION, make_client

pytestmark = pytest.mark.anyio


async def test_run_task_returns_the_final_response(served_example: str) -> None:
    async with httpx.AsyncClient(base_url=served_example, timeout=30) as http:
        response = await run_task(http, "POST", "/words", files={"text": ("t", b"a b c")})
    assert response.status_code == 200
    assert response.json() == {"count": 3}


async def test_progress_arrives_over_the_event_stream(served_example: str) -> None:
    """A 4 MiB text: the word count reports progress per MiB; the callback sees the task's
    statuses as the event stream sends them, then the result comes."""
    seen: list[dict[str, Any]] = []
    text = b"word " * (800 * 1024)
    async with httpx.AsyncClient(base_url=served_example, timeout=60) as http:
        response = await run_task(
            http, "POST", "/words", files={"text": ("t", text)}, on_progress=seen.append, wait=0
        )
    assert response.json() == {"count": 800 * 1024}
    assert seen, "no status event"
    assert all(LOCATION.match(f"/words/{status['task_id']}") for status in seen)
    assert {status["status"] for status in seen} <= {"queued", "running", "retrying"}


def test_run_task_sync(served_example: str) -> None:
    response = run_task_sync("POST", f"{served_example}/words", files={"text": ("t", b"one two")})
    assert response.json() == {"count": 2}


async def test_a_caller_that_gives_up_deletes_the_task(worker: object) -> None:
    from tests.apps import probe_app

    async with LifespanManager(probe_app), make_client(probe_app) as http:
        started = time.monotonic()
        with pytest.raises(TaskTimeout) as raised:
            await run_task(http, "POST", "/slow?seconds=20", timeout=1.5, wait=1)
        assert time.monotonic() - started < 10
        assert (await http.get(raised.value.location)).status_code == 404


async def test_a_cancelled_caller_deletes_the_task_too(worker: object) -> None:
    from tests.apps import probe_app

    locations: list[str] = []

    async def note(response: httpx.Response) -> None:
        if "location" in response.headers:
            locations.append(response.headers["location"])

    transport = httpx.ASGITransport(app=probe_app)
    hooks = {"response": [note]}
    async with (
        LifespanManager(probe_app),
        httpx.AsyncClient(transport=transport, base_url="http://t", event_hooks=hooks) as http,
    ):
        with anyio.move_on_after(1.5):
            await run_task(http, "POST", "/slow?seconds=20", wait=1)
        assert locations
        assert (await http.get(locations[0])).status_code == 404


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "async_task_middleware.client", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_command_line(served_example: str, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox")
    done = cli("POST", f"{served_example}/words", "-F", f"text=@{text}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"count": 4}
    queued = cli("POST", f"{served_example}/words", "-F", f"text=@{text}", "--no-wait")
    assert queued.returncode == 0
    url = queued.stdout.strip()
    assert url.startswith(f"{served_example}/words/")
    assert LOCATION.match(url.removeprefix(served_example))
    # The endpoint's own 422 (no 'text' field): exit code 4, its body printed.
    invalid = cli("POST", f"{served_example}/words", "-F", "other=x")
    assert invalid.returncode == 4
    assert "text" in invalid.stdout


async def test_list_tasks_and_the_tasks_command(served_example: str) -> None:
    """The example serves the owner's collection at /tasks: the client pages through it, and
    ``tasks URL`` prints one JSON line a task."""
    from async_task_middleware.client import list_tasks

    who = {"authorization": f"Bearer lister-{time.time_ns()}"}
    async with httpx.AsyncClient(base_url=served_example, timeout=30) as http:
        mine = []
        for _ in range(5):
            sent = await http.post("/words", files={"text": ("t", b"a b")}, headers=who)
            mine.append(sent.headers["location"])
        listed = [t async for t in list_tasks(http, "/tasks", limit=2, headers=who)]
        assert [t["location"] for t in listed] == mine[::-1]
        queued = [t async for t in list_tasks(http, "/tasks", status=["failed"], headers=who)]
        assert queued == []
    done = cli("tasks", f"{served_example}/tasks", "-H", f"Authorization: {who['authorization']}")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [t["location"] for t in lines] == mine[::-1]
    anonymous = cli("tasks", f"{served_example}/tasks")
    assert anonymous.returncode == 4
