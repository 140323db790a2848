"""Metrics an operator can scrape, when ``prometheus-client`` is installed (the ``metrics``
extra); without it every hook here is skipped by one flag test, and nothing else runs.

Web side: ``async_task_middleware_submissions_total{route, answer}`` (answer: the status code,
303, 429, 503...), ``async_task_middleware_waiters`` (long polls and event streams held now).
Worker side: ``async_task_middleware_queue_wait_seconds{route}`` (submission to start),
``async_task_middleware_replay_seconds{route, outcome}`` (outcome: the status code, or
``failed``), and in its main process ``async_task_middleware_pushed_again_total`` (tasks whose
message the broker lost, pushed again by the sweep), and
``async_task_middleware_webhook_deliveries_total{event, outcome}``. They go to
prometheus-client's default registry: serve it as usual
(``app.mount("/metrics", prometheus_client.make_asgi_app())`` on the web side,
``prometheus_client.start_http_server(port)`` in a worker, with ``PROMETHEUS_MULTIPROC_DIR`` set
for prefork workers and multi-process web servers, as prometheus-client documents).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .types import Message, Send

try:
    from prometheus_client import Counter, Gauge, Histogram
except ImportError:  # the metrics extra is not installed
    ENABLED = False
else:
    ENABLED = True
    _SUBMISSIONS = Counter(
        "async_task_middleware_submissions",
        "Submissions to marked routes, by route and answer.",
        ["route", "answer"],
    )
    _WAITERS = Gauge(
        "async_task_middleware_waiters",
        "Long polls and event streams held now.",
        multiprocess_mode="livesum",
    )
    _QUEUE_WAIT = Histogram(
        "async_task_middleware_queue_wait_seconds",
        "From submission to the start of its replay.",
        ["route"],
    )
    _REPLAY = Histogram(
        "async_task_middleware_replay_seconds",
        "Replay durations, by route and outcome.",
        ["route", "outcome"],
    )
    _WEBHOOKS = Counter(
        "async_task_middleware_webhook_deliveries",
        "Webhook delivery attempts, by event and outcome (delivered, retried, stopped, given up).",
        ["event", "outcome"],
    )
    _PUSHED_AGAIN = Counter(
        "async_task_middleware_pushed_again",
        "Tasks whose message the broker lost (a Redis restart or failover, a worker killed as "
        "it took it), pushed again by the sweep.",
    )


# Each route and answer's counter, looked up once: ``labels()`` takes a lock and builds its key
# on every call, on every submission's path.
_COUNTERS: dict[tuple[str, int], Any] = {}


def counting(send: Send, route: str) -> Send:
    """``send`` that counts the submission's answer (called only when ``ENABLED``)."""

    async def counted(message: Message) -> None:
        if message["type"] == "http.response.start":
            key = (route, message["status"])
            child = _COUNTERS.get(key)
            if child is None:
                child = _COUNTERS[key] = _SUBMISSIONS.labels(route, str(key[1]))
            child.inc()
        await send(message)

    return counted


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    if not ENABLED:
        yield
        return
    _WAITERS.inc()
    try:
        yield
    finally:
        _WAITERS.dec()


def replayed(route: Any, queued: float, seconds: float, outcome: str) -> None:
    if ENABLED:
        if queued >= 0:
            _QUEUE_WAIT.labels(str(route)).observe(queued)
        _REPLAY.labels(str(route), outcome).observe(seconds)


def pushed_again(count: int) -> None:
    if ENABLED:
        _PUSHED_AGAIN.inc(count)


def webhook_attempted(event: str, outcome: str) -> None:
    if ENABLED:
        _WEBHOOKS.labels(event, outcome).inc()
