"""The replay pool: thousands of I/O-bound replays in one worker process, no thread each.

Celery's threads pool holds a thread for each running task; a replay's thread only waits for
the event loop, where the replay runs. At thousands in flight, starting those threads and
passing the interpreter's lock among them costs more than the replays. This pool runs the
replay task's first steps (``Job.begin``, ``Job.start``: count the delivery, hand the replay to
the loop) on a thread of its own, for the deliveries that arrive together at once (a draining
queue: one ``BEGIN`` round trip a batch, ``LINGER``), and runs Celery's own trace on one of its
step threads when the replay is done: ``Job.wait`` finds it finished, ``finish`` stores the
outcome, and Celery acknowledges the message, signals and logs as for any task. The replays
that end together have their outcomes stored first, on another thread of its own, in one
``FINISH`` round trip (``Job.finish_in``: those with nothing to do between the end and the
outcome). Other tasks run as on the threads pool. Delivery, leases, time limits (a
blocked loop is noticed by the beater), cancellation and progress are the replay's own, the
same on every pool.

    CELERY_CUSTOM_WORKER_POOL=async_task_middleware:ReplayPool \\
        celery -A myproject.tasks worker --pool custom --concurrency 5000
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.concurrency.thread import TaskPool as ThreadsPool
from kombu.serialization import loads, prepare_accept_content

from .._shared.binding import TASK_NAME
from .job import Job
from .runtime import Runtime

logger = logging.getLogger(__name__)

#: Threads for the replays' last steps (Celery's trace, ``FINISH``): each is short (a Redis
#: round trip or two), so a few serve thousands of replays; more would only contend.
STEP_THREADS = 4
#: The most deliveries begun, or outcomes stored, in one round trip.
BATCH = 100
#: Seconds a delivery (or a replay's end) that follows another this closely waits for more to
#: go with it. A replay runs for seconds or minutes; this is what it trades for the worker's
#: CPU per replay.
LINGER = 0.02

#: A delivery handed to the pool: its step's future, then ``_prepare``'s arguments.
_Arrival = tuple[
    Future[None],
    Runtime,
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any] | None,
    Callable[..., Any] | None,
    Callable[..., Any] | None,
]
#: A replay's end: ``_trace``'s arguments.
_End = tuple[
    Runtime,
    Job | None,
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any] | None,
    Callable[..., Any] | None,
]

_T = TypeVar("_T")


class ReplayPool(ThreadsPool):  # type: ignore[misc]
    """Celery's threads pool, with replays that hold no thread while they run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps = ThreadPoolExecutor(STEP_THREADS, thread_name_prefix="replay-steps")
        self._arrivals: queue.SimpleQueue[_Arrival | None] = queue.SimpleQueue()
        self._ends: queue.SimpleQueue[_End | None] = queue.SimpleQueue()
        self._beginner = threading.Thread(
            target=self._beginning, name="replay-steps-begin", daemon=True
        )
        self._ender = threading.Thread(target=self._ending, name="replay-steps-end", daemon=True)
        self._beginner.start()
        self._ender.start()
        self._pending = 0  # replays applied whose trace has not returned
        # For ``inspect stats``: deliveries begun, and in how many round trips; replays ended,
        # how many of their outcomes were stored together, and in how many round trips.
        self._begun = self._begin_trips = self._ended = self._together = self._end_trips = 0
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
        begun: Future[None] = Future()
        self._arrivals.put((begun, runtime, target, args, kwargs, callback, accept_callback))
        return ApplyResult(begun)

    def _beginning(self) -> None:
        """Begin the replays as they arrive, in batches: one round trip for their ``BEGIN``s,
        then each replay handed to the loop."""
        for batch in _batches(self._arrivals):
            try:
                self._begin(batch)
            except Exception as exc:  # this thread begins every replay: it must go on
                logger.exception("beginning %d replays failed", len(batch))
                for begun, *_ in batch:
                    if not begun.done():
                        begun.set_exception(exc)

    def _ending(self) -> None:
        """Store the outcomes of the replays that end together in one round trip, then hand
        each to a step thread for its trace."""
        for batch in _batches(self._ends):
            try:
                self._store(batch)
            except Exception:  # nothing is lost: each trace stores its own outcome
                logger.exception("storing %d outcomes together failed", len(batch))
            for end in batch:
                self._steps.submit(self._trace, *end)

    def _begin(self, batch: list[_Arrival]) -> None:
        prepared = [(arrival[0], self._prepare(*arrival[1:])) for arrival in batch]
        jobs = [found for _, found in prepared if found is not None]
        answers: list[Any] = [None] * len(jobs)
        self._begun += len(jobs)
        pipe = _pipeline([job for job, _ in jobs])
        self._begin_trips += len(jobs) if pipe is None else 1
        if pipe is not None:
            try:
                for job, _ in jobs:
                    job.begin_in(pipe)
                answers = pipe.execute(raise_on_error=False)
            except Exception:
                # Redis away, or failing over: each begins on its own below, tried again as
                # any step is; a BEGIN that did run counts its delivery once (its token).
                answers = [None] * len(jobs)
        for (job, trace), answer in zip(jobs, answers, strict=True):
            attempts = answer if isinstance(answer, int) else None  # an error: ``begin`` again
            try:
                job.begin(attempts)
                job.start()
            except BaseException:
                trace()  # kept in the job: its trace raises it where the task would have
            else:
                assert job.beat is not None
                assert job.future is not None
                job.beat.overdue = trace  # a loop blocked past the deadline: the trace says so
                job.future.add_done_callback(trace)
        for begun, _ in prepared:
            begun.set_result(None)

    def _store(self, batch: list[_End]) -> None:
        jobs = [job for _, job, *_ in batch if job is not None]
        self._ended += len(jobs)
        pipe = _pipeline(jobs)
        if pipe is None:
            return  # each trace stores its own
        queued = [job for job in jobs if job.finish_in(pipe)]
        if len(queued) < 2:
            return  # not worth a round trip of its own: ``finish`` runs the one queued
        self._end_trips += 1
        try:
            answers = pipe.execute(raise_on_error=False)
        except Exception:
            return  # Redis away, or failing over: each trace's ``finish`` tries again
        for job, answer in zip(queued, answers, strict=True):
            self._together += job.stored(answer)

    def _prepare(
        self,
        runtime: Runtime,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
    ) -> tuple[Job, Callable[..., None]] | None:
        """The delivery's job and the trace that ends it; None if the trace already ran (a
        message the job cannot be made from: the trace fails it as Celery does)."""
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
            self._ends.put((runtime, taken, target, args, kwargs, callback))

        if job is None:
            trace()
            return None
        return job, trace

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
        self._arrivals.put(None)
        self._ends.put(None)
        self._beginner.join()
        self._ender.join()
        self._steps.shutdown(wait=True)
        super().on_stop()

    def _get_info(self) -> Any:
        info = super()._get_info()
        info["replays"] = self._pending
        info["deliveries begun"] = self._begun
        info["begin round trips"] = self._begin_trips
        info["replays ended"] = self._ended
        info["outcomes stored together"] = self._together
        info["their round trips"] = self._end_trips
        return info


def _pipeline(jobs: list[Job]) -> Any:
    """One pipeline for the jobs' round trip; None for fewer than two, or jobs on more than one
    store (one per result backend: a pool serves one Celery app)."""
    if len(jobs) < 2 or len({id(job.store) for job in jobs}) > 1:
        return None
    return jobs[0].store.pipeline(transaction=False)


def _batches(arrivals: queue.SimpleQueue[_T | None]) -> Iterator[list[_T]]:
    """What arrives, in batches of up to ``BATCH``, until None: a lone arrival goes at once; one
    taken within ``LINGER`` of the last batch's first (a queue draining, replays ending
    together) waits up to that long for more."""
    previous = -LINGER  # when the last batch's first was taken
    while (first := arrivals.get()) is not None:
        now = time.monotonic()
        deadline = now + LINGER if now - previous < LINGER else now
        previous = now
        batch = [first]
        while len(batch) < BATCH:
            try:
                more = arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if more is None:
                arrivals.put(None)  # stopping: after this batch
                break
            batch.append(more)
        yield batch
