"""The worker side: the Celery task that replays a captured request against the app.

The task counts deliveries and checks the submission record before it runs (``BEGIN``), opens
the sealed headers, hands the replay to this process's event loop (``_loop``) under the time
limit, lets the process's beater (``_beat``) keep its heartbeat and stop it when deleted, and
stores the outcome ready to send (``FINISH``).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from billiard.process import current_process
from celery import Celery, Task, states
from celery.exceptions import Ignore
from celery.signals import worker_init, worker_ready, worker_shutdown

from . import _consumer, _scripts
from ._apps import Apps
from ._beat import Beat, process_beater
from ._celery import (
    HARD_LIMIT_GRACE,
    TASK_NAME,
    Binding,
    ConfigurationError,
    hard_time_limit,
    refuse_cluster,
    survive_failover,
)
from ._deployment import again
from ._lease import LeaseKeeper
from ._loop import ReplayTimeLimit, process_loop, replace_process_loop
from ._metrics import replayed
from ._policy import Keys, SecretKey, join_headers
from ._progress import TaskCancelled
from ._replay import replay
from ._sweep import Sweeper
from ._types import ASGIApp
from ._wire import check, split_response, unpack_response

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024
#: What the replay task returns, and Celery's meta says: the response itself is in the store.
STORED = {"v": 1, "stored": True}
_backends: dict[tuple[int, int], Any] = {}
_backends_lock = threading.Lock()
# 25 minutes: with its grace, under RabbitMQ's default consumer_timeout of 30.
DEFAULT_TIME_LIMIT = 1500.0
# RabbitMQ's default consumer_timeout: a delivery held longer is redelivered.
AMQP_CONSUMER_TIMEOUT = 1800.0


class AttemptsExhausted(Exception):
    """The replay's worker died on every delivery, ``max_attempts`` times."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"the worker died on each of {attempts} attempts")


class LoopBlocked(Exception):
    """The replay held its worker's event loop (or thread) past the hard time limit."""


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
) -> Task:
    """Register the replay task on ``celery_app``; one worker serves every app in ``apps``.

    ``apps`` maps the ``name=`` each app's middleware was given to the app itself or to its
    import string (``"myproject.main:app"``, imported in the worker process on first use, which
    also avoids an import cycle between the app and the module that makes the Celery app).
    ``secret_key`` is the middleware's: it opens the credential headers sealed at submission.

    The task is late-acknowledged and re-queued when its worker process dies, so a request
    may run more than once: endpoints on marked routes should be idempotent. A request whose
    worker dies ``max_attempts`` times (one that kills it, say) then fails with a 500 instead
    of looping. ``time_limit`` (default: Celery's ``task_time_limit``, else 25 minutes) cancels
    a replay in its own event loop and fails it, on every pool; a replay that blocks the loop
    past the limit plus a grace fails too, and its process is replaced (prefork) or its loop
    is (threads). With a Redis broker, ``leases`` (on by default, ``_lease``) keep a running
    task's message from being handed to a second worker, whatever ``visibility_timeout`` is.
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
    heartbeat_ms = int(max(5.0, 4 * cancel_check_interval) * 1000)
    registry = Apps(apps)
    scripts: dict[int, tuple[Any, Any]] = {}
    _watch_worker(celery_app, leases)

    def run(task: Task, envelope: Any) -> dict[str, Any]:
        task_id: str = task.request.id
        backend = _process_backend(task)
        store = backend.client  # the result backend's own (synchronous) Redis client
        if id(store) not in scripts:
            scripts[id(store)] = (
                store.register_script(_scripts.BEGIN),
                store.register_script(_scripts.FINISH),
            )
        begin, finish = scripts[id(store)]
        record_key, heartbeat_key = binding.record_key(task_id), binding.heartbeat_key(task_id)
        check(envelope)  # a foreign or damaged message fails here, stored as its failure
        rid = str(envelope.get("request_id") or "-")  # the client's, to join the web's logs
        owner_set = binding.owner_set_key(envelope.get("owner"))

        def drop() -> None:
            # Deleted, expired, or never fully submitted: nothing runs, nothing is stored.
            stale = (binding.meta_key(task_id), binding.attempts_key(task_id), heartbeat_key)
            again(lambda: store.delete(*stale), "dropping a task")
            logger.info("task %s dropped: its record is gone (request %s)", task_id, rid)
            raise Ignore()

        channel = binding.events_channel(task_id)

        def finished(outcome: bytes) -> bool:
            ends = [
                record_key,
                binding.result_key(task_id),
                owner_set,
                heartbeat_key,
                binding.body_key(task_id),
                binding.meta_key(task_id),
            ]
            head, apart = (outcome, None) if outcome == _scripts.FAILED else split_response(outcome)
            values = [
                head,
                binding.expires,
                task_id,
                channel,
                b"" if apart is None else apart,
                b"" if outcome == _scripts.FAILED else _success_meta(backend, task_id),
            ]
            return bool(again(lambda: finish(keys=ends, args=values), "storing an outcome"))

        queued_set = binding.queued_set_key(str(envelope.get("app")), str(envelope.get("route")))
        starts = [
            record_key,
            binding.attempts_key(task_id),
            queued_set,
            binding.result_key(task_id),
            heartbeat_key,
            binding.message_key(task_id),
        ]
        token = uuid.uuid4().hex  # this delivery's: a BEGIN tried again counts it once
        values = [binding.expires, task_id, heartbeat_ms, channel, token]
        attempts = again(lambda: begin(keys=starts, args=values), "beginning a task")
        if attempts == -1:
            logger.info("task %s already has its outcome: not run again", task_id)
            raise Ignore()
        if attempts == 0:
            drop()
        if attempts > max_attempts:
            # Each earlier delivery died with its worker: stop redelivering, report a failure.
            logger.warning("task %s failed: its worker died %d times", task_id, attempts - 1)
            backend.mark_as_failure(task_id, AttemptsExhausted(attempts - 1))
            finished(_scripts.FAILED)
            raise Ignore()
        submitted = envelope.get("submitted")
        queued = time.time() - submitted if isinstance(submitted, float | int) else -1.0
        route = envelope.get("route")
        logger.info(
            "task %s started: %s, attempt %d, %.3f s after submission (request %s)",
            *(task_id, route, attempts, queued, rid),
        )
        began = time.monotonic()
        try:
            app = registry.get(str(envelope.get("app", "")))
            headers = join_headers(envelope["headers"], envelope.get("sealed"), keys)

            running: list[Beat] = []

            def progress(data: dict[str, Any]) -> None:
                # Called from the endpoint (its loop, or its thread for a def endpoint).
                if running and running[0].cancelled:
                    raise TaskCancelled(f"task {task_id} was deleted")
                task.update_state(task_id=task_id, state="STARTED", meta={"progress": data})
                if running and running[0].cancelled:
                    store.delete(binding.meta_key(task_id))  # raced the delete: taken back
                    raise TaskCancelled(f"task {task_id} was deleted")
                store.publish(channel, b"progress")

            coro = replay(app, envelope, headers, max_response_size, lifespan_timeout)
            limit = _route_limit(envelope, soft_limit)
            future = process_loop().run(coro, progress, limit)
            beater = process_beater(store, binding, cancel_check_interval, heartbeat_ms)
            beat = beater.add(task_id, future)
            running.append(beat)
            try:
                # One wait: the beater stops a deleted task, the loop's own limit a long one;
                # a replay still running past both has blocked its loop.
                packed = future.result(timeout=limit + HARD_LIMIT_GRACE / 2)
            except concurrent.futures.CancelledError:
                if beat.cancelled:
                    drop()
                raise
            except TimeoutError:
                if future.done():
                    raise  # the endpoint's own TimeoutError: a failure like any other
                future.cancel()
                raise LoopBlocked(f"the replay did not stop within its {limit:g} s limit") from None
            except BaseException:
                future.cancel()  # a worker shutdown: stop the replay too
                raise
            finally:
                beater.remove(task_id)
        except Ignore:
            raise
        except LoopBlocked as exc:
            _replace_blocked(task, task_id, exc, finished)
            raise
        except BaseException as exc:
            if isinstance(exc, Exception):
                # Stored before the outcome, so that whoever reads FAILED finds the details;
                # Celery stores the same again as the task raises.
                backend.mark_as_failure(task_id, exc)
            finished(_scripts.FAILED)  # leave the owner's unfinished tasks
            took = time.monotonic() - began
            logger.info("task %s failed after %.3f s (request %s)", task_id, took, rid)
            replayed(route, queued, took, "failed")
            raise
        # A record deleted while the replay ran keeps nothing.
        if not finished(packed):
            drop()
        took = time.monotonic() - began
        code = unpack_response(packed)[0]
        logger.info("task %s finished: %d in %.3f s (request %s)", task_id, code, took, rid)
        replayed(route, queued, took, str(code))
        return dict(STORED)

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
    return task


def _process_backend(task: Task) -> Any:
    """One result backend per process for the replay's own reads and writes. Celery keeps one
    per thread (for its result consumers), so that on the threads pool each of a thousand
    threads would build a backend, its connection pool and its connections; the Redis client
    underneath is thread-safe, and one serves them all."""
    key = (os.getpid(), id(task.app))
    backend = _backends.get(key)
    if backend is None:
        with _backends_lock:
            backend = _backends.setdefault(key, task.backend)
    return backend


def _success_meta(backend: Any, task_id: str) -> Any:
    """The result meta Celery itself would store for the replay's success (its result says
    that the response is stored), for AsyncResult, Flower and the like."""
    return backend.encode(
        {
            "status": states.SUCCESS,
            "result": STORED,
            "traceback": None,
            "children": [],
            # Celery's app.now() in one step (it goes through UTC and dateutil: slow).
            "date_done": datetime.datetime.now(backend.app.timezone).isoformat(),
            "task_id": task_id,
        }
    )


def _route_limit(envelope: dict[str, Any], default: float) -> float:
    """The route's own time limit, carried in the message, else the worker's."""
    limit = envelope.get("time_limit")
    if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
        return float(limit)
    return default


def _replace_blocked(task: Task, task_id: str, exc: LoopBlocked, finished: Any) -> None:
    """A replay that blocks the loop (``time.sleep`` in an ``async def``) or a thread past its
    limit would stall every replay after it in this process: fail it, then replace the process
    (prefork: the pool starts a new one) or, where other replays share the process, its loop."""
    logger.error("task %s failed: %s; the blocked work is abandoned", task_id, exc)
    task.backend.mark_as_failure(task_id, ReplayTimeLimit(str(exc)))
    finished(_scripts.FAILED)
    if current_process().name.startswith("ForkPoolWorker"):
        logger.error("replacing worker process %d, blocked by task %s", os.getpid(), task_id)
        os._exit(1)  # the redelivery finds the outcome stored and does not run again
    replace_process_loop()


def _watch_worker(celery_app: Celery, leases: bool) -> None:
    """Where the worker starts: check its final settings, keep its leases, and sweep after
    each Redis restart or failover (``_sweep``)."""
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
