"""Probe apps: plain Starlette endpoints that show what a replay sees and does."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
from celery import Celery
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from async_task_middleware import AsyncTaskMiddleware, report_progress
from async_task_middleware import Route as AtmRoute
from tests.worker import SECRET_KEY, celery_app

STARTUPS = 0


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    global STARTUPS
    STARTUPS += 1
    yield {"greeting": "hello from lifespan", "startups": STARTUPS}


async def incr(key: str) -> None:
    # The runs are counted apart from the deployment under test when it is Sentinel's.
    url = os.environ.get("ATM_TEST_COUNTER_URL") or os.environ["REDIS_URL"]
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.incr(key)
    finally:
        await client.aclose()


async def echo(request: Request) -> JSONResponse:
    scope = request.scope
    return JSONResponse(
        {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1") if scope.get("raw_path") else None,
            "root_path": scope["root_path"],
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body": base64.b64encode(await request.body()).decode(),
            "client": list(scope["client"]) if scope.get("client") else None,
            "server": list(scope["server"]) if scope.get("server") else None,
            "scheme": scope["scheme"],
            "path_params": request.path_params,
        }
    )


async def slow(request: Request) -> JSONResponse:
    seconds = float(request.query_params.get("seconds", "1"))
    await asyncio.sleep(seconds)
    return JSONResponse({"slept": seconds})


async def mark(request: Request) -> JSONResponse:
    """Counts its runs in Redis under ``key``, after sleeping ``seconds``."""
    await asyncio.sleep(float(request.query_params.get("seconds", "0")))
    await incr(request.query_params["key"])
    return JSONResponse({"marked": request.query_params["key"]})


async def flaky(request: Request) -> JSONResponse:
    """Fails its first ``fail`` runs under ``key`` (``how``: ``raise`` a ConnectionError,
    ``value`` a ValueError, or answer ``503``), then answers how many runs it took."""
    key = request.query_params["key"]
    url = os.environ.get("ATM_TEST_COUNTER_URL") or os.environ["REDIS_URL"]
    client = redis.asyncio.Redis.from_url(url)
    try:
        runs = int(await client.incr(key))
    finally:
        await client.aclose()
    if runs <= int(request.query_params.get("fail", "2")):
        how = request.query_params.get("how", "raise")
        if how == "raise":
            raise ConnectionError("the dependency is down")
        if how == "value":
            raise ValueError("not a transient failure")
        return JSONResponse({"down": True}, status_code=503)
    return JSONResponse({"runs": runs})


async def cookies(request: Request) -> Response:
    response = Response(b"two cookies", media_type="text/plain")
    response.set_cookie("a", "1")
    response.set_cookie("b", "2")
    response.headers.append("x-repeated", "one")
    response.headers.append("x-repeated", "two")
    response.headers["connection"] = "keep-alive"  # hop-by-hop: never replayed
    return response


async def state(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "greeting": request.state.greeting,
            "startups": request.state.startups,
            "pid": os.getpid(),
        }
    )


async def boom(request: Request) -> Response:
    raise RuntimeError("secret detail from /srv/app/settings.py")


async def background(request: Request) -> JSONResponse:
    async def later() -> None:
        await asyncio.sleep(0.5)
        await incr(request.query_params["key"])

    return JSONResponse({"scheduled": True}, background=BackgroundTask(later))


async def progress(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("delay", "0")))
    report_progress(step=1, of=2)
    await asyncio.sleep(float(request.query_params.get("seconds", "2")))
    return JSONResponse({"done": True})


async def burst(request: Request) -> JSONResponse:
    """``n`` progress reports in a row, none awaited, then a wait of ``seconds``."""
    n = int(request.query_params["n"])
    for step in range(1, n + 1):
        report_progress(step=step, of=n)
    await asyncio.sleep(float(request.query_params.get("seconds", "1")))
    return JSONResponse({"reported": n})


async def lag(request: Request) -> JSONResponse:
    """The longest its event loop was held up, in ``seconds`` of 10 ms sleeps."""
    loop = asyncio.get_running_loop()
    end, longest = loop.time() + float(request.query_params.get("seconds", "1")), 0.0
    while (now := loop.time()) < end:
        await asyncio.sleep(0.01)
        longest = max(longest, loop.time() - now - 0.01)
    return JSONResponse({"lag": longest})


def steps(request: Request) -> JSONResponse:
    """A ``def`` endpoint (run in a thread): ``steps`` steps of 0.1 s, each counted in Redis
    under ``key`` and reported as progress."""
    import redis as sync_redis

    key, total = request.query_params["key"], int(request.query_params["steps"])
    url = os.environ.get("ATM_TEST_COUNTER_URL") or os.environ["REDIS_URL"]
    with sync_redis.Redis.from_url(url) as client:
        for step in range(1, total + 1):
            time.sleep(0.1)
            client.incr(key)
            report_progress(done=step, total=total)
    return JSONResponse({"steps": total})


async def die(request: Request) -> JSONResponse:
    """Counts its runs, then kills the worker process running it: a poison request."""
    await incr(request.query_params["key"])
    os.kill(os.getpid(), signal.SIGKILL)
    return JSONResponse({"unreachable": True})


async def block(request: Request) -> JSONResponse:
    """Blocks the event loop (a synchronous sleep in an async endpoint): the mistake that time
    limits must survive."""
    time.sleep(float(request.query_params.get("seconds", "1")))
    return JSONResponse({"blocked": True})


async def not_found(request: Request) -> JSONResponse:
    return JSONResponse({"detail": "no such thing"}, status_code=404)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


async def stream(request: Request) -> StreamingResponse:
    """NDJSON, one line of ``size`` bytes every ``delay`` s, ``n`` lines: each says when it was
    sent, so that a reader can tell pieces that arrive spread out from pieces that arrive at
    the end. ``?fail=K`` raises after line K; ``?after=S``: a background task sleeps S s after
    the last line, before the replay's outcome can be stored."""
    n = int(request.query_params.get("n", "10"))
    delay = float(request.query_params.get("delay", "0.1"))
    size = int(request.query_params.get("size", "64"))
    fail = int(request.query_params.get("fail", "-1"))
    static = "static" in request.query_params  # no time in the lines: the same bytes each run
    after = float(request.query_params.get("after", "0"))

    async def lines() -> AsyncIterator[bytes]:
        for i in range(n):
            if i == fail:
                raise RuntimeError("the stream broke")
            sent = 0.0 if static else time.time()
            head = f'{{"i":{i},"sent":{sent:.6f},"pad":"'.encode()
            yield head + b"x" * max(0, size - len(head) - 3) + b'"}\n'
            await asyncio.sleep(delay)

    later = BackgroundTask(asyncio.sleep, after) if after else None
    return StreamingResponse(lines(), media_type="application/x-ndjson", background=later)


PROBE_ROUTES = [
    "POST /echo",
    "POST /items/{item_id:int}",
    "POST /slow",
    "POST /mark",
    "POST /flaky",
    "POST /cookies",
    "POST /state",
    "POST /boom",
    "POST /background",
    "POST /progress",
    "POST /steps",
    "POST /die",
    "POST /notfound",
    "POST /block",
    "POST /lag",
    "POST /burst",
    "POST /stream",
]


def build_probe(
    celery: Celery, *, outer: list[Middleware] | None = None, **options: Any
) -> Starlette:
    """The probe app; the worker replays into ``probe_app``, which has the same endpoints.
    ``outer``: the app's own middleware, in front of ours (as the framework guides place it)."""
    options.setdefault("routes", PROBE_ROUTES)
    options.setdefault("name", "probe")
    return Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/items/{item_id:int}", echo, methods=["POST", "GET"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/mark", mark, methods=["POST"]),
            Route("/flaky", flaky, methods=["POST"]),
            Route("/cookies", cookies, methods=["POST"]),
            Route("/state", state, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/background", background, methods=["POST"]),
            Route("/progress", progress, methods=["POST"]),
            Route("/steps", steps, methods=["POST"]),
            Route("/die", die, methods=["POST"]),
            Route("/notfound", not_found, methods=["POST"]),
            Route("/block", block, methods=["POST"]),
            Route("/lag", lag, methods=["POST"]),
            Route("/burst", burst, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/capped", stream, methods=["POST"]),
            Route("/health", health),
            WebSocketRoute("/ws", ws),
        ],
        middleware=[
            *(outer or []),
            Middleware(
                AsyncTaskMiddleware,
                celery_app=celery,
                secret_key=SECRET_KEY,
                **options,
            ),
        ],
        lifespan=lifespan,
    )


probe_app = build_probe(celery_app)

# The probe app with a route whose responses may not pass 64 KiB (``Route(max_response_size)``).
capped_app = build_probe(
    celery_app,
    routes={
        **{spec: AtmRoute() for spec in PROBE_ROUTES},
        "POST /capped": AtmRoute(max_response_size=64 * 1024),
    },
)

# The same probe app behind a mount: its status URLs live under /api.
mounted_app = Starlette(routes=[Mount("/api", app=probe_app)])

# The same again, registered in the worker as the app the server serves (the mount around
# it), not as the app the middleware sits in.
served_mount_app = Starlette(routes=[Mount("/api", app=build_probe(celery_app, name="mounted"))])

# Wrapped directly, as a Quart or Django app is; the worker registers the app inside.
inner_app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
wrapped_app = AsyncTaskMiddleware(
    inner_app, celery_app=celery_app, routes=["POST /echo"], name="inner", secret_key=SECRET_KEY
)

# A middleware whose name the worker gives to an app without it: a clear error.
misregistered_app = build_probe(celery_app, name="misregistered", debug=True)
elsewhere_app = Starlette(routes=[Route("/health", health)])

# A body must arrive within a second here: the trickle test serves this one with uvicorn.
strict_app = build_probe(celery_app, body_timeout=1.0)


@asynccontextmanager
async def slow_lifespan(app: Starlette) -> AsyncIterator[None]:
    await asyncio.sleep(float(os.environ.get("ATM_TEST_SLOW_STARTUP", "5")))
    yield


# An app whose lifespan startup outlasts the worker's lifespan_timeout.
slow_lifespan_app = Starlette(
    routes=[Route("/echo", echo, methods=["POST"])],
    middleware=[
        Middleware(
            AsyncTaskMiddleware,
            celery_app=celery_app,
            name="slow-lifespan",
            routes=["POST /echo"],
            secret_key=SECRET_KEY,
        )
    ],
    lifespan=slow_lifespan,
)
