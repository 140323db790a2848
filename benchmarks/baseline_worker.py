"""The hand-written baseline's Celery app and its plain tasks: ``celery -A
benchmarks.baseline_worker worker`` consumes the ``baseline`` queue."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

celery_app = Celery("baseline", broker=REDIS_URL, backend=REDIS_URL)
celery_app.conf.update(task_default_queue="baseline", worker_prefetch_multiplier=1)


@celery_app.task(name="baseline.count_words")
def count_words(text: str) -> int:
    return len(text.split())


@celery_app.task(
    name="baseline.count_words_durable",
    acks_late=True,
    reject_on_worker_lost=True,
)
def count_words_durable(text: str) -> int:
    """The same count with the replay's delivery settings: a fair measure of its overhead."""
    return len(text.split())


@celery_app.task(
    name="baseline.count_words_through_endpoint",
    acks_late=True,
    reject_on_worker_lost=True,
)
def count_words_through_endpoint(body: str, content_type: str) -> int:
    """The same count through the example's own endpoint, called in-process on a loop of this
    thread (FastAPI, its multipart parsing, CORS in front; no middleware): what any task that
    runs the endpoint itself pays, with nothing of the library's own."""
    status, answer = _loop().run_until_complete(_post(body.encode(), content_type))
    assert status == 200, status
    count: int = json.loads(answer)["count"]
    return count


@celery_app.task(
    name="baseline.sleep", acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def sleep(seconds: float) -> None:
    """Celery alone with I/O-bound work, on its threads pool: a wait, then the time it ended
    pushed by one client the whole process shares (Celery's own result store would build a
    backend and a connection pool in each of the pool's threads)."""
    time.sleep(seconds)
    _shared().rpush(SLEEPS_DONE, time.time())


@celery_app.task(
    name="baseline.sleep_through_endpoint",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def sleep_through_endpoint(seconds: float) -> None:
    """The I/O-bound replay's work without the library, on Celery's threads pool: the probe
    app's own ``POST /slow`` endpoint (Starlette, ``await asyncio.sleep``), called in process
    on one event loop the process's task threads share (a thread waits for it, as any task
    that runs an async endpoint itself does); then the time it ended, as ``sleep``."""
    future = asyncio.run_coroutine_threadsafe(_slow(seconds), _shared_loop())
    status, _ = future.result()
    assert status == 200, status
    _shared().rpush(SLEEPS_DONE, time.time())


#: Where ``baseline.sleep`` records the time each one ended.
SLEEPS_DONE = "baseline-sleeps-done"


@functools.cache
def _shared() -> redis.Redis:
    # Threads wait their turn for one of its connections, as the replay's store does.
    pool = redis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=50, timeout=None)
    return redis.Redis(connection_pool=pool)


_endpoint: dict[str, Any] = {}


def _loop() -> asyncio.AbstractEventLoop:
    """This process's loop, run in the task's own thread, and the endpoint's app beside it."""
    if "loop" not in _endpoint:
        from fastapi import FastAPI
        from fastapi.middleware.cors import CORSMiddleware

        from examples.wordcount.fastapi_app import count_words as endpoint
        from examples.wordcount.worker import CORS

        app = FastAPI()
        app.post("/words")(endpoint)
        app.add_middleware(CORSMiddleware, **CORS)
        _endpoint.update(loop=asyncio.new_event_loop(), app=app)
    loop: asyncio.AbstractEventLoop = _endpoint["loop"]
    return loop


@functools.cache
def _shared_loop() -> asyncio.AbstractEventLoop:
    """One loop for the whole process, in a thread of its own, and the probe's endpoint."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from tests.apps import slow

    _endpoint["slow"] = Starlette(routes=[Route("/slow", slow, methods=["POST"])])
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="baseline-loop", daemon=True).start()
    return loop


async def _slow(seconds: float) -> tuple[int, bytes]:
    scope = _scope("POST", "/slow", f"seconds={seconds}".encode(), [])
    return await _call(_endpoint["slow"], scope, b"")


async def _post(body: bytes, content_type: str) -> tuple[int, bytes]:
    headers = [(b"content-type", content_type.encode())]
    return await _call(_endpoint["app"], _scope("POST", "/words", b"", headers), body)


def _scope(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"baseline"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("baseline", 80),
    }


async def _call(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    """``app`` called as a server would, its status and body."""
    scope["headers"].append((b"content-length", str(len(body)).encode()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
