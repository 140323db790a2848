"""The test suite's worker: the word-count apps and the probe apps, one Celery worker."""

import os

from celery import Celery

from async_task_middleware import Webhooks, register_replay

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET_KEY = os.environ["ATM_SECRET_KEY"]

# A Sentinel deployment: REDIS_URL names the sentinels, this the master's service.
SENTINEL = (
    {"master_name": os.environ["REDIS_SENTINEL_MASTER"]}
    if os.environ.get("REDIS_SENTINEL_MASTER")
    else {}
)

celery_app = Celery("tests", broker=os.environ.get("BROKER_URL") or REDIS_URL, backend=REDIS_URL)
celery_app.conf.update(
    result_backend_transport_options=SENTINEL,
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "confirm_publish": True,
        "visibility_timeout": int(os.environ.get("ATM_TEST_VISIBILITY", 60)),
        # Sweep for messages of dead workers every 2 s, not every 100 s.
        "unacked_restore_interval": int(os.environ.get("ATM_TEST_RESTORE_INTERVAL", 2)),
        "unacked_restore_throttle": 1,
        **SENTINEL,
    },
    result_expires=int(os.environ.get("ATM_TEST_RESULT_EXPIRES", 24 * 3600)),
)

register_replay(
    celery_app,
    {
        "wordcount-fastapi": "examples.wordcount.fastapi_app:app",
        "wordcount-starlette": "examples.wordcount.starlette_app:app",
        "wordcount-litestar": "examples.wordcount.litestar_app:app",
        "wordcount-quart": "examples.wordcount.quart_app:app",
        "wordcount-django": "examples.wordcount.django_app:app",
        "probe": "tests.apps:probe_app",
        "mounted": "tests.apps:served_mount_app",
        "inner": "tests.apps:inner_app",
        "misregistered": "tests.apps:elsewhere_app",
        "slow-lifespan": "tests.apps:slow_lifespan_app",
        "takes-logging": "tests.apps_logging:app",
    },
    secret_key=SECRET_KEY,
    time_limit=float(os.environ.get("ATM_TEST_TIME_LIMIT", 20)),
    lifespan_timeout=float(os.environ.get("ATM_TEST_LIFESPAN_TIMEOUT", 30)),
    leases=os.environ.get("ATM_TEST_LEASES", "1") == "1",
    max_attempts=2,
    # Webhooks for the webhook tests' own worker: a short timeout and schedule.
    webhooks=Webhooks(
        secret=os.environ["ATM_TEST_WEBHOOK_SECRET"],
        timeout=float(os.environ.get("ATM_TEST_WEBHOOK_TIMEOUT", 1)),
        schedule=(0.3, 0.3, 0.3),
        queue=os.environ.get("ATM_TEST_WEBHOOK_QUEUE", "async-task-middleware-webhooks"),
    )
    if os.environ.get("ATM_TEST_WEBHOOK_SECRET")
    else None,
)

if os.environ.get("ATM_TEST_LATE_EXTENDED"):
    # A setting changed after registration: the worker must still refuse it where it starts.
    celery_app.conf.result_extended = True

if os.environ.get("ATM_TEST_METRICS_PORT"):
    # A threads-pool worker runs its replays in this process: its metrics are served here.
    import prometheus_client

    prometheus_client.start_http_server(int(os.environ["ATM_TEST_METRICS_PORT"]))


@celery_app.task(name="tests.add")
def add(a: int, b: int) -> int:
    """A plain Celery task beside the replay, on whichever pool the worker runs."""
    return a + b


@celery_app.task(name="tests.count")
def count(key: str) -> None:
    """Counts its runs in Redis under ``key``: a message run twice shows."""
    import redis

    redis.Redis.from_url(REDIS_URL).incr(key)
