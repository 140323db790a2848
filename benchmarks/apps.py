"""The contenders of the benchmark, each served by uvicorn as ``benchmarks.apps:<name>``.

- ``baseline``: the seed article's hand-written way on FastAPI: ``POST /words`` calls Celery's
  ``send_task`` and remembers the id in a Redis set (to tell unknown from pending);
  ``GET /words/{id}`` checks the set and reads ``AsyncResult``.
- ``ceiling``: a bare ASGI app doing the least Redis work the protocol needs: one pipelined
  round trip to submit (record + queue push), one GET to poll. No Celery, no framework.
- ``middleware``: the word-count example on FastAPI (``examples.wordcount.fastapi_app``).
- ``starlette``: the same on Starlette (``examples.wordcount.starlette_app``): the middleware
  without FastAPI's own layers.
- ``bare`` / ``bare_wrapped`` and ``fastapi_plain`` / ``middleware``: an unmarked route,
  without and with the middleware.

``with_lag_probe`` wraps any of them with a loop-lag monitor read at ``GET /_lag``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import uuid
from typing import Annotated, Any

import redis
import redis.asyncio
from celery.result import AsyncResult
from fastapi import FastAPI, File, Response, UploadFile
from fastapi.responses import JSONResponse

from async_task_middleware import AsyncTaskMiddleware, header_owner
from benchmarks.baseline_worker import celery_app as baseline_celery
from examples.wordcount.fastapi_app import app as middleware
from examples.wordcount.starlette_app import app as starlette  # noqa: F401 (served by name)
from examples.wordcount.worker import SECRET_KEY, celery_app, frozen_heap

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# -- the hand-written baseline ----------------------------------------------------------------

_known = redis.Redis.from_url(REDIS_URL)

baseline = FastAPI(lifespan=frozen_heap)


@baseline.post("/words", status_code=303)
def create(text: Annotated[UploadFile, File()], response: Response) -> None:
    task = baseline_celery.send_task("baseline.count_words", args=[text.file.read().decode()])
    _known.sadd("baseline-known", task.id)
    response.headers["Location"] = f"/words/{task.id}"


@baseline.get("/words/{task_id}")
def get(task_id: str, response: Response) -> Any:
    if not _known.sismember("baseline-known", task_id):
        return JSONResponse({"detail": "not found"}, status_code=404)
    result = AsyncResult(task_id, app=baseline_celery)
    if result.state == "SUCCESS":
        return {"count": result.result}
    if result.state == "FAILURE":
        return JSONResponse(None, status_code=500)
    response.status_code = 202
    return None


# -- the ceiling -------------------------------------------------------------------------------

_ceiling_redis: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}


def _redis() -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    if loop not in _ceiling_redis:
        pool = redis.asyncio.BlockingConnectionPool.from_url(REDIS_URL, max_connections=64)
        _ceiling_redis[loop] = redis.asyncio.Redis(connection_pool=pool)
    return _ceiling_redis[loop]


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        # As the examples do (``frozen_heap``): every contender's garbage collector alike.
        gc.collect()
        gc.freeze()
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def ceiling(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    path: str = scope["path"]
    if scope["method"] == "POST" and path == "/words":
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        task_id = str(uuid.uuid4())
        async with _redis().pipeline(transaction=True) as pipe:
            pipe.set(f"ceiling-{task_id}", b'{"status":"queued"}', ex=86400)
            pipe.lpush("ceiling-queue", body)
            await pipe.execute()
        headers = [(b"location", f"/words/{task_id}".encode()), (b"content-length", b"0")]
        await _send(send, 303, headers, b"")
    elif scope["method"] == "GET" and path.startswith("/words/"):
        state = await _redis().get(f"ceiling-{path[7:]}")
        if state is None:
            await _send(send, 404, [(b"content-length", b"0")], b"")
        elif state.startswith(b'{"status"'):
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await _send(send, 202, headers, state)
        else:
            await _send(send, 200, [(b"content-type", b"application/json")], state)
    else:
        await _send(send, 200, [(b"content-type", b"application/json")], b'{"ok":true}')


# -- unmarked routes, without and with the middleware ------------------------------------------


async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _send(send, 200, [(b"content-type", b"application/json")], b'{"ok":true}')


bare_wrapped = AsyncTaskMiddleware(bare, celery_app=celery_app, routes=["POST /words"])

# The owner's collection on its own, with no cap on an owner's tasks: for the list's cost.
listed = AsyncTaskMiddleware(
    bare,
    celery_app=celery_app,
    routes=["POST /words"],
    name="listed",
    owner=header_owner("authorization"),
    secret_key=SECRET_KEY,
    tasks_path="/tasks",
)


def _fastapi_health_app() -> FastAPI:
    """The word-count example's routes on FastAPI, for the unmarked-route comparison: the
    same app with and without the middleware, so that only the middleware differs."""
    app = FastAPI()

    @app.post("/words")
    async def count(text: Annotated[UploadFile, File()]) -> dict[str, int]:
        return {"count": len((await text.read()).split())}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return app


fastapi_plain = _fastapi_health_app()
fastapi_wrapped = _fastapi_health_app()
fastapi_wrapped.add_middleware(
    AsyncTaskMiddleware, celery_app=celery_app, routes=["POST /words"], name="wordcount-fastapi"
)


# -- event-loop lag ----------------------------------------------------------------------------


def with_lag_probe(app: Any) -> Any:
    """``app`` plus a task that measures how late a 1 ms sleep wakes, read at ``GET /_lag``
    (p99 and max in ms since the previous read)."""
    samples: list[float] = []
    gc_pauses: list[float] = []
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(on_gc)

    async def monitor() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            samples.append(time.perf_counter() - start - 0.001)

    async def probed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            asyncio.get_running_loop().create_task(monitor())
        elif scope["type"] == "http" and scope["path"] == "/_lag":
            ordered = sorted(samples) or [0.0]
            samples.clear()
            report = {
                "p99_ms": ordered[int(len(ordered) * 0.99) - 1 if len(ordered) > 1 else 0] * 1e3,
                "max_ms": ordered[-1] * 1e3,
                "samples": len(ordered),
                "gc_max_ms": max(gc_pauses, default=0.0) * 1e3,
            }
            gc_pauses.clear()
            await _send(
                send, 200, [(b"content-type", b"application/json")], json.dumps(report).encode()
            )
            return
        await app(scope, receive, send)

    return probed


middleware_lag = with_lag_probe(middleware)
ceiling_lag = with_lag_probe(ceiling)


def __getattr__(name: str) -> Any:
    # The probe app (the test suite's) only when asked for: it needs the test worker's settings.
    if name == "probe_lag":
        from tests.apps import probe_app

        return with_lag_probe(probe_app)
    raise AttributeError(name)
