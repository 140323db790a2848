"""The replay pool: thousands of I/O-bound replays in one worker process, no thread each.

Celery's threads pool holds a thread for each running task; a replay's thread only waits for
the event loop, where the replay runs. At thousands in flight, starting those threads and
passing the interpreter's lock among them costs more than the replays. This pool runs the
replay task's first steps (``Job.begin``, ``Job.start``: count the delivery, hand the replay to
the loop) on one of its threads, lets go of it while the replay runs, and runs Celery's own
trace when the replay is done: ``Job.wait`` finds it finished, ``finish`` stores the outcome,
and Celery acknowledges the message, signals and logs as for any task. Other tasks run as on
the threads pool. Delivery, leases, time limits (a blocked loop is noticed by the beater),
cancellation and progress are the replay's own, the same on every pool.

    CELERY_CUSTOM_WORKER_POOL=async_task_middleware:ReplayPool \\
        celery -A myproject.tasks worker --pool custom --concurrency 5000
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.concurrency.thread import TaskPool as ThreadsPool
from kombu.serialization import loads, prepare_accept_content

from .._shared.binding import TASK_NAME
from .job import Job
from .runtime import Runtime

#: Threads for the replays' steps before and after they run: each step is short (a Redis
#: round trip or two), so a few serve thousands of replays; more would only contend.
STEP_THREADS = 4


class ReplayPool(ThreadsPool):  # type: ignore[misc]
    """Celery's threads pool, with replays that hold no thread while they run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps = ThreadPoolExecutor(STEP_THREADS, thread_name_prefix="replay-steps")
        self._pending = 0  # replays applied whose trace has not returned
        self._idle = threading.Condition()
        self._accept = prepare_accept_content(self.app.conf.accept_content)  # type: ignore[no-untyped-call]

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **rest: Any,
    ) -> ApplyResult:
        runtime = getattr(self.app.tasks.get(TASK_NAME), "runtime", None)
        if not isinstance(runtime, Runtime) or not args or args[0] != TASK_NAME:
            return super().on_apply(target, args, kwargs, callback, accept_callback, **rest)
        with self._idle:
            self._pending += 1
        begun = self._steps.submit(
            self._begin, runtime, target, args, kwargs, callback, accept_callback
        )
        return ApplyResult(begun)

    def _begin(
        self,
        runtime: Runtime,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
    ) -> None:
        if accept_callback:
            accept_callback(os.getpid(), time.monotonic())
        task_id, body, content_type, content_encoding = args[1], args[3], args[4], args[5]
        try:
            decoded = loads(body, content_type, content_encoding, accept=self._accept)  # type: ignore[no-untyped-call]
            (envelope, *_), _, _ = decoded
            # The trace takes the body decoded (no content type), as Celery's own does.
            args = (*args[:3], decoded, None, None, *args[6:])
            job: Job | None = Job(runtime, self.app.tasks[TASK_NAME], task_id, envelope)
        except Exception:
            job = None  # the trace meets the same error and fails the task as Celery does

        # Taken once by whichever comes first (the replay done, its deadline, a failed step);
        # and the job's future, whose callback this is, holds no reference back to the job.
        handed = [job]

        def trace(*_: Any) -> None:
            try:
                taken = handed.pop()
            except IndexError:
                return
            self._steps.submit(self._trace, runtime, taken, target, args, kwargs, callback)

        if job is None:
            trace()
            return
        try:
            job.begin()
            job.start()
        except BaseException:
            trace()  # kept in the job: its trace raises it where the task would have
            return
        assert job.beat is not None
        assert job.future is not None
        job.beat.overdue = trace  # a loop blocked past the deadline: the trace says so
        job.future.add_done_callback(trace)

    def _trace(
        self,
        runtime: Runtime,
        job: Job | None,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
    ) -> None:
        runtime.hand(job)  # Celery's trace runs the task's body on this thread, next
        try:
            apply_target(target, args, kwargs, callback)
        finally:
            runtime.hand(None)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def on_stop(self) -> None:
        # A warm shutdown lets the running replays finish, as the threads pool does.
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self._steps.shutdown(wait=True)
        super().on_stop()

    def _get_info(self) -> Any:
        info = super()._get_info()
        info["replays"] = self._pending
        return info
