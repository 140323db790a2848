"""The Celery app, the one worker for all the word-count apps, and the settings they share.

    celery -A examples.wordcount.worker worker

``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) is the result backend and, unless
``BROKER_URL`` names another one (``amqp://guest:guest@127.0.0.1:5672//``), the broker. For a
highly available Redis it names the sentinels,
``sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/0``, and ``REDIS_SENTINEL_MASTER`` the
master's service name; TLS goes in the URL: ``rediss://host:6380/0?ssl_cert_reqs=required``.
``ATM_SECRET_KEY`` (required; the same for the web processes and the worker) signs owner
identities and encrypts credential headers at rest.
"""

import contextlib
import gc
import os
from collections.abc import AsyncIterator
from typing import Any

from celery import Celery

from async_task_middleware import Webhooks, header_owner, register_replay

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SENTINEL: dict[str, Any] = (
    {"master_name": os.environ["REDIS_SENTINEL_MASTER"]}
    if os.environ.get("REDIS_SENTINEL_MASTER")
    else {}
)
SECRET_KEY = os.environ.get("ATM_SECRET_KEY", "")
if not SECRET_KEY:
    raise SystemExit(
        "set ATM_SECRET_KEY to the same random value for the web process and the worker, e.g.\n"
        "  export ATM_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
    )

celery_app = Celery(
    "wordcount",
    broker=os.environ.get("BROKER_URL") or REDIS_URL,
    backend=REDIS_URL,
)
celery_app.conf.update(
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # With RabbitMQ, a 303 only for a task the broker confirmed; Redis ignores it.
        "confirm_publish": True,
        # Redis: the worker's leases renew the tasks it holds, so a short visibility timeout
        # is safe for tasks of any length, and a dead worker's tasks run again within ~70 s.
        "visibility_timeout": 60,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        # No hang on a dead connection.
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        **SENTINEL,
    },
    result_backend_transport_options=SENTINEL,
    worker_prefetch_multiplier=1,
)

#: Completion webhooks, on when ATM_WEBHOOK_ALLOW names where they may go (comma-separated URL
#: prefixes or host patterns) and ATM_WEBHOOK_SECRET signs them ("whsec_..."); off otherwise.
WEBHOOKS = (
    Webhooks(
        allow=[rule.strip() for rule in os.environ["ATM_WEBHOOK_ALLOW"].split(",") if rule.strip()],
        secret=os.environ.get("ATM_WEBHOOK_SECRET") or None,
    )
    if os.environ.get("ATM_WEBHOOK_ALLOW")
    else None
)

#: The middleware's protection, the same for every framework: a task belongs to the
#: Authorization header it was sent with (none: anonymous, readable by whoever has its URL),
#: credentials are encrypted at rest, and intake is bounded.
PROTECTION: dict[str, Any] = {
    "owner": header_owner("authorization"),
    "secret_key": SECRET_KEY,
    "max_tasks_per_owner": 100,
    "max_queued_per_route": 10_000,
    "webhooks": WEBHOOKS,
    # GET /tasks lists the caller's own tasks (an owner's: anonymous callers have none).
    "tasks_path": "/tasks",
}

#: Cross-origin access for a browser page on another origin: it runs in front of the
#: middleware, so its headers are on the 303, the 202s and the result alike.
CORS: dict[str, Any] = {
    "allow_origins": ["http://localhost:3000"],
    "allow_methods": ["GET", "POST", "DELETE"],
    "allow_headers": ["Authorization"],
    "expose_headers": ["Location", "Retry-After"],
}


@contextlib.asynccontextmanager
async def frozen_heap(app: object) -> AsyncIterator[None]:
    """The web apps' lifespan: what imports and startup built is set apart from the garbage
    collector's later full collections (``gc.freeze()``, after one collection that frees the
    startup's own garbage). A busy web process runs a full collection every few thousand
    requests, and each walked every object the process holds; frozen, it walks only what came
    after. Side by side on one core, the Starlette example served 6 % more submissions a
    second with it; any app can do the same (docs/deployment.md)."""
    gc.collect()
    gc.freeze()
    yield


# The apps are imported in the worker on first use, by name, so that they can import
# celery_app from here without a cycle.
register_replay(
    celery_app,
    {
        "wordcount-fastapi": "examples.wordcount.fastapi_app:app",
        "wordcount-starlette": "examples.wordcount.starlette_app:app",
        "wordcount-litestar": "examples.wordcount.litestar_app:app",
        "wordcount-quart": "examples.wordcount.quart_app:app",
        "wordcount-django": "examples.wordcount.django_app:app",
    },
    secret_key=SECRET_KEY,
    webhooks=WEBHOOKS,
)
