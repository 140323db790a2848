"""The worker side: ``register_replay`` puts the replay task on the app's Celery app.

Each delivery of the task is a ``Job`` (``_worker.job``); the checks and threads a worker needs
where it starts (settings, leases, the sweeper) are set up here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from celery.signals import celeryd_after_setup, worker_init, worker_ready, worker_shutdown

from .._shared.binding import (
    HARD_LIMIT_GRACE,
    TASK_NAME,
    Binding,
    ConfigurationError,
    hard_time_limit,
    refuse_cluster,
    survive_failover,
)
from .._shared.policy import Keys, SecretKey
from .._shared.types import ASGIApp
from .._shared.webhooks import Webhooks
from . import consumer as _consumer
from .apps import Apps
from .deliver import register_delivery
from .hooks import HookSender
from .lease import LeaseKeeper
from .runtime import Runtime
from .sweep import Sweeper

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024
# 25 minutes: with its grace, under RabbitMQ's default consumer_timeout of 30.
DEFAULT_TIME_LIMIT = 1500.0
# RabbitMQ's default consumer_timeout: a delivery held longer is redelivered.
AMQP_CONSUMER_TIMEOUT = 1800.0


def register_replay(
    celery_app: Celery,
    apps: Mapping[str, ASGIApp | str],
    *,
    secret_key: SecretKey | None = None,
    max_attempts: int = 3,
    time_limit: float | None = None,
    max_response_size: int = 10 * _MiB,
    lifespan_timeout: float = 30.0,
    cancel_check_interval: float = 0.5,
    leases: bool = True,
    amqp_consumer_timeout: float = AMQP_CONSUMER_TIMEOUT,
    webhooks: Webhooks | None = None,
) -> Task:
    """Register the replay task on ``celery_app``; one worker serves every app in ``apps``.

    The task is late-acknowledged and re-queued when its worker process dies, so a request
    may run more than once: endpoints on marked routes should be idempotent. For I/O-bound
    endpoints, run the worker on ``ReplayPool``.

    Args:
        celery_app: The Celery app the web side's middleware was given.
        apps: Maps the ``name=`` each app's middleware was given to the app itself or to its
            import string (``"myproject.main:app"``, imported in the worker process on first
            use, which also avoids an import cycle between the app and the module that makes
            the Celery app).
        secret_key: The middleware's: opens the credential headers sealed at submission; a
            task that carries them fails (``SealError``) on a worker without it.
        max_attempts: Deliveries a task gets: a request whose worker died on each (one that
            kills it, say) then fails with a 500 instead of looping.
        time_limit: Seconds a replay may run (default: Celery's ``task_time_limit``, else 1500 s,
            under RabbitMQ's default ``consumer_timeout``): it is cancelled in its own event
            loop and fails (``ReplayTimeLimit``), on every pool. A replay that blocks its loop
            past the limit is failed 5 s later (``LoopBlocked``) and its process (prefork) or
            loop (threads, ``ReplayPool``) replaced.
        max_response_size: Bytes; a larger response fails the task (``ResponseTooLarge``).
        lifespan_timeout: Seconds for the app's lifespan startup and shutdown in the worker.
        cancel_check_interval: How often, in seconds, the worker process renews its running
            replays' heartbeats and records (one script call per 500 replays) and stops those
            that were deleted.
        leases: With a Redis broker, renew the claim on every message the worker holds
            (``_worker.lease``), so that no running task's message is handed to a second
            worker, whatever ``visibility_timeout`` is.
        amqp_consumer_timeout: RabbitMQ's ``consumer_timeout`` as the server is set, in
            seconds; the hard time limit must stay below it.
        webhooks: The middleware's ``Webhooks``, with its ``secret``: registers the delivery
            task and has this app's workers consume its queue too.

    Returns:
        The registered Celery task.
    """
    if not apps:
        raise ConfigurationError("register_replay(apps=...) is empty: name at least one app")
    if TASK_NAME in celery_app.tasks:
        raise ConfigurationError("register_replay was already called for this Celery app")
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise ConfigurationError(f"max_attempts={max_attempts!r}: it must be at least 1")
    try:
        keys = Keys(secret_key) if secret_key is not None else None
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    survive_failover(celery_app)  # before Celery's backend is built: it reads them once
    binding = Binding.of(celery_app)
    if celery_app.conf.worker_consumer in (None, _consumer.DEFAULT):
        celery_app.conf.worker_consumer = _consumer.PATH
    soft_limit = float(time_limit or celery_app.conf.task_time_limit or DEFAULT_TIME_LIMIT)
    hard_limit = hard_time_limit(
        celery_app, soft_limit, leases=leases, amqp_consumer_timeout=amqp_consumer_timeout
    )
    runtime = Runtime(
        binding=binding,
        apps=Apps(apps),
        keys=keys,
        max_attempts=max_attempts,
        time_limit=soft_limit,
        max_response_size=max_response_size,
        lifespan_timeout=lifespan_timeout,
        cancel_check_interval=cancel_check_interval,
        heartbeat_ms=int(max(5.0, 4 * cancel_check_interval) * 1000),
    )
    if webhooks is not None:
        if not isinstance(webhooks, Webhooks):
            raise ConfigurationError(f"webhooks={webhooks!r}: it must be a Webhooks(...)")
        register_delivery(celery_app, binding, webhooks)
        runtime.hooks = HookSender(binding, webhooks)
        _consume_webhooks(celery_app, webhooks.queue)
    _watch_worker(celery_app, leases)

    def run(task: Task, envelope: Any) -> dict[str, Any]:
        # A function, not the bound method: Celery's ``bind=True`` passes the task itself.
        return runtime.run(task, envelope)

    task: Task = celery_app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # The heartbeat says "running"; Celery's STARTED write would cost a round trip more.
        track_started=False,
        # FINISH writes Celery's SUCCESS meta with the outcome, in the same step; Celery's own
        # write would cost two round trips more (it reads the meta before it writes). Failures
        # are still stored by Celery, whatever raised them.
        ignore_result=True,
        store_errors_even_if_ignored=True,
        # The limit is enforced in the replay's loop, on every pool; Celery's hard limit stays
        # as the last resort of the prefork pool, after the replay's own.
        time_limit=hard_limit + HARD_LIMIT_GRACE,
        serializer="json",
        shared=False,  # registered on this Celery app only, not on every app in the process
        resultrepr_maxsize=64,
    )(run)
    task.runtime = runtime  # for the replay pool
    return task


def _consume_webhooks(celery_app: Celery, queue: str) -> None:
    """Every worker of ``celery_app`` consumes the deliveries' queue beside those it was
    given (``-Q``): the signal Celery names for queues a worker should always consume."""

    def add_queue(sender: Any, instance: Any, **_: Any) -> None:
        if instance.app is celery_app:
            instance.app.amqp.queues.select_add(queue)

    celeryd_after_setup.connect(add_queue, weak=False)


def _watch_worker(celery_app: Celery, leases: bool) -> None:
    """Where the worker starts: check its final settings, keep its leases, and sweep for
    what Redis or a killed worker dropped (``_worker.sweep``)."""
    threads: list[LeaseKeeper | Sweeper] = []

    def check_settings(sender: Any, **_: Any) -> None:
        # Settings may have changed since registration; Celery logs and ignores a signal
        # handler's exception, so a refusal has to stop the worker itself.
        if getattr(sender, "app", None) is celery_app:
            try:
                Binding.of(celery_app)
                refuse_cluster(celery_app)
            except ConfigurationError as exc:
                logger.critical("refusing to start: %s", exc)
                raise SystemExit(f"async-task-middleware: {exc}") from None

    def start_threads(sender: Any, **_: Any) -> None:
        if getattr(sender, "app", None) is not celery_app:
            return
        if leases and Binding.is_redis_broker(celery_app):
            keeper = LeaseKeeper(celery_app)
            threads.append(keeper)
            logger.info("leases renewed every %g s", keeper.interval)
        binding = Binding.of(celery_app)
        if binding.fast_queue is not None:
            threads.append(Sweeper(celery_app, binding))
        for thread in threads:
            thread.start()

    def stop_threads(**_: Any) -> None:
        for thread in threads:
            thread.stop()

    worker_init.connect(check_settings, weak=False)
    worker_ready.connect(start_threads, weak=False)
    worker_shutdown.connect(stop_threads, weak=False)
