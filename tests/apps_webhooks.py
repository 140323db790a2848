"""A webhook receiver, served by uvicorn on loopback for the webhook tests: it keeps every
delivery it gets (path, headers, body) in its Redis, and answers as its path says.

- ``/ok``: 200.
- ``/flaky``: 500 to the first two attempts of each ``webhook-id``, then 200.
- ``/hang``: no answer for 5 s (longer than the worker's timeout), then 200.
- ``/gone``: 410 Gone.
- ``/hang-once``: the first attempt of each ``webhook-id`` as ``/hang``, then 200.
- ``/flaky-once``: 500 to the first attempt of each ``webhook-id``, then 200.

Each delivery is kept with the time it arrived (``at``); each one answered 2xx counts under
``webhooks-accepted-<webhook-id>``.
"""

import asyncio
import json
import os
import time

import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

RECEIVED = "webhooks-received"
store = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])


async def receive(request: Request) -> Response:
    at = time.time()
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-") or k == "host"}
    kind = request.path_params["kind"]
    attempt = await store.incr(f"webhooks-attempts-{kind}-{headers.get('webhook-id')}")
    await store.rpush(
        RECEIVED, json.dumps({"path": kind, "headers": headers, "body": body.decode(), "at": at})
    )
    if (kind == "flaky" and attempt <= 2) or (kind == "flaky-once" and attempt == 1):
        return Response(status_code=500)
    if kind == "hang" or (kind == "hang-once" and attempt == 1):
        await asyncio.sleep(5)
    if kind == "gone":
        return Response(status_code=410)
    await store.incr(f"webhooks-accepted-{headers.get('webhook-id')}")
    return Response(status_code=200)


app = Starlette(routes=[Route("/{kind}", receive, methods=["POST"])])
