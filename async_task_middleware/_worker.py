"""The worker side: the Celery task that replays a captured request against the app.

The task counts deliveries and checks the submission record before it runs (``BEGIN``), opens
the sealed headers, hands the replay to this process's event loop (``_loop``), stops it when
the task is deleted, and stores the response ready to send (``FINISH``).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from . import _consumer, _scripts
from ._celery import TASK_NAME, Binding, ConfigurationError, hard_time_limit
from ._loop import process_loop
from ._policy import Keys, SecretKey, join_headers
from ._replay import replay
from ._types import ASGIApp
from ._wire import check

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024
DEFAULT_TIME_LIMIT = 1800.0


class AttemptsExhausted(Exception):
    """The replay's worker died on every delivery, ``max_attempts`` times."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"the worker died on each of {attempts} attempts")


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
) -> Task:
    """Register the replay task on ``celery_app``; one worker serves every app in ``apps``.

    ``apps`` maps the ``name=`` each app's middleware was given to the app itself or to its
    import string (``"myproject.main:app"``, imported in the worker process on first use, which
    also avoids an import cycle between the app and the module that makes the Celery app).
    ``secret_key`` is the middleware's: it opens the credential headers sealed at submission.

    The task is late-acknowledged and re-queued when its worker process dies, so a request
    may run more than once: endpoints on marked routes should be idempotent. A request whose
    worker dies ``max_attempts`` times (one that kills it, say) then fails with a 500 instead
    of looping. ``time_limit`` (default: Celery's ``task_time_limit``, else 30 minutes) stops a
    replay and fails it; with a Redis broker it must stay below the ``visibility_timeout``, or
    Redis would hand a running task to a second worker: such a configuration refuses to start.
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
    binding = Binding.of(celery_app)
    if celery_app.conf.worker_consumer in (None, _consumer.DEFAULT):
        celery_app.conf.worker_consumer = _consumer.PATH
    soft_limit = float(time_limit or celery_app.conf.task_time_limit or DEFAULT_TIME_LIMIT)
    # The soft limit cancels the replay in-process; the hard one, a little later, kills a
    # process whose endpoint ignores cancellation (a blocking call in a thread).
    hard_limit = hard_time_limit(celery_app, soft_limit)
    registry = _Apps(apps)
    scripts: dict[int, tuple[Any, Any]] = {}

    def run(task: Task, envelope: Any) -> dict[str, Any]:
        task_id: str = task.request.id
        store = task.backend.client  # the result backend's own (synchronous) Redis client
        if id(store) not in scripts:
            scripts[id(store)] = (
                store.register_script(_scripts.BEGIN),
                store.register_script(_scripts.FINISH),
            )
        begin, finish = scripts[id(store)]
        record_key = binding.record_key(task_id)
        check(envelope)  # a foreign or damaged message fails here, stored as its failure
        owner_set = binding.owner_set_key(envelope.get("owner"))

        def drop() -> None:
            # Deleted, expired, or never fully submitted: nothing runs, nothing is stored.
            store.delete(binding.meta_key(task_id), binding.attempts_key(task_id))
            logger.info("task %s dropped: its submission record is gone", task_id)
            raise Ignore()

        def finished(packed: bytes) -> bool:
            keys = [record_key, binding.result_key(task_id), owner_set]
            return bool(finish(keys=keys, args=[packed, binding.expires, task_id]))

        queued_set = binding.queued_set_key(str(envelope.get("app")), str(envelope.get("route")))
        attempts = begin(
            keys=[record_key, binding.attempts_key(task_id), queued_set],
            args=[binding.expires, task_id],
        )
        if attempts is None:
            drop()
        elif attempts > max_attempts:
            # Each earlier delivery died with its worker: stop redelivering, report a failure.
            logger.warning("task %s failed: its worker died %d times", task_id, attempts - 1)
            finished(b"")
            task.backend.mark_as_failure(task_id, AttemptsExhausted(attempts - 1))
            raise Ignore()
        try:
            app = registry.get(str(envelope.get("app", "")))
            headers = join_headers(envelope["headers"], envelope.get("sealed"), keys)

            def progress(data: dict[str, Any]) -> None:
                task.update_state(task_id=task_id, state="STARTED", meta={"progress": data})

            coro = replay(app, envelope, headers, max_response_size, lifespan_timeout)
            future = process_loop().run(coro, progress)
            try:
                while True:
                    try:
                        packed = future.result(timeout=cancel_check_interval)
                        break
                    except concurrent.futures.TimeoutError:
                        if not store.exists(record_key):
                            future.cancel()
                            drop()
            except BaseException:
                future.cancel()  # a time limit or a worker shutdown: stop the replay too
                raise
        except Ignore:
            raise
        except BaseException:
            finished(b"")  # leave the owner's unfinished tasks; Celery stores the failure
            raise
        # The response goes to a key of its own, ready to send; Celery's result only says so.
        # A record deleted while the replay ran keeps nothing.
        if not finished(packed):
            drop()
        return {"v": 1, "stored": True}

    task: Task = celery_app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        track_started=True,
        soft_time_limit=soft_limit,
        time_limit=hard_limit,
        serializer="json",
        shared=False,  # registered on this Celery app only, not on every app in the process
        resultrepr_maxsize=64,
    )(run)
    return task


class _Apps:
    """The apps one worker serves, by name, imported on first use."""

    def __init__(self, apps: Mapping[str, ASGIApp | str]) -> None:
        self._specs = dict(apps)
        self._resolved: dict[str, ASGIApp] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ASGIApp:
        with self._lock:
            app = self._resolved.get(name)
            if app is None:
                spec = self._specs.get(name)
                if spec is None:
                    raise LookupError(f"no app named {name!r} is registered in this worker")
                app = _import(spec) if isinstance(spec, str) else spec
                self._resolved[name] = app
            return app


def _import(spec: str) -> ASGIApp:
    module, sep, attribute = spec.partition(":")
    if not sep:
        raise ConfigurationError(f"app {spec!r} is not of the form 'package.module:attribute'")
    app: ASGIApp = getattr(importlib.import_module(module), attribute)
    return app
