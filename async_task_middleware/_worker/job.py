"""One delivery of the replay task, from its first step to its last.

``begin`` counts the delivery and checks the submission record (``BEGIN``); ``start`` opens the
sealed headers and hands the replay to this process's event loop (``_worker.loop``) under the
time limit, with the process's beater (``_worker.beat``) keeping its heartbeat and stopping it
when deleted; ``wait`` waits for it; ``finish`` stores the outcome ready to send (``FINISH``),
``fail`` the failure. The task runs the steps in a row on its pool's thread; the replay pool
(``_worker.pool``) runs ``begin`` and ``start`` before Celery's trace and the rest inside it, so
that no thread waits while the replay runs, and may store a plain outcome (``finish_in``) just
before the trace.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billiard.process import current_process
from celery import Task
from celery.exceptions import Ignore

from .._shared import scripts as _scripts
from .._shared.binding import HARD_LIMIT_GRACE
from .._shared.deployment import again
from .._shared.metrics import replayed
from .._shared.policy import join_headers
from .._shared.retry import policy_of
from .._shared.wire import check, split_response, status_of
from .backend import STORED, process_backend, success_meta
from .beat import Beat, Beater, process_beater
from .hooks import ProgressThrottle
from .live import Relay
from .loop import Loop, ReplayTimeLimit, process_loop, replace_process_loop
from .progress import TaskCancelled, on_event_loop, process_writer
from .replay import replay

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger(__name__)

#: Seconds a finished replay waits for its progress reports to be stored: far longer than a
#: write takes while Redis answers; past it, the outcome is stored all the same.
PROGRESS_FLUSH = 10.0


class AttemptsExhausted(Exception):
    """The replay's worker died on every delivery, ``max_attempts`` times."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"the worker died on each of {attempts} attempts")


class LoopBlocked(Exception):
    """The replay held its worker's event loop (or thread) past the hard time limit."""


class Job:
    """One delivery. ``begin`` and ``start`` happen once: called again (by the trace of a
    delivery the replay pool began), they raise what they raised the first time."""

    def __init__(self, runtime: Runtime, task: Task, task_id: str, envelope: Any) -> None:
        self.runtime = runtime
        self.task = task
        self.task_id = task_id
        self.backend = process_backend(task)
        self.store = self.backend.client  # the result backend's own (synchronous) client
        self._begin_script, self._finish_script, self._stream_script = runtime.scripts(self.store)
        b = runtime.binding
        check(envelope)  # a foreign or damaged message fails here, stored as its failure
        self.envelope: dict[str, Any] = envelope
        self.rid = str(envelope.get("request_id") or "-")  # the client's, to join the web's logs
        self.route = envelope.get("route")
        self.channel = b.events_channel(task_id)
        self.record_key, self.heartbeat_key = b.record_key(task_id), b.heartbeat_key(task_id)
        self.limit = _route_limit(envelope, runtime.time_limit)
        self.queued = -1.0
        self.attempt = 0
        self.began = 0.0
        self.future: concurrent.futures.Future[bytes] | None = None
        self.beat: Beat | None = None
        self.beater: Beater | None = None
        self.loop: Loop | None = None
        self._steps: dict[str, BaseException | None] = {}
        self.reported = False  # progress handed to the process's writer
        # ``FINISH``'s call where the pool queued it (``finish_in``), and its answer: tried again,
        # the same call (its webhook message too) goes again.
        self._early: tuple[list[Any], list[Any]] | None = None
        self._stored: int | None = None
        hook = envelope.get("webhook")
        self.hook: dict[str, Any] | None = hook if isinstance(hook, dict) else None
        self.progress_due = ProgressThrottle()

    def begin(self, attempts: int | None = None) -> None:
        """Count this delivery; a deleted or finished task, or one whose worker died
        ``max_attempts`` times, goes no further (``Ignore``). ``attempts``: ``BEGIN``'s answer
        where the caller ran it (``begin_in``), else it runs here."""
        self._once("begin", lambda: self._begin(attempts))

    def begin_in(self, pipe: Any) -> None:
        """Queue this delivery's ``BEGIN`` in ``pipe``: the replay pool begins the deliveries
        that arrived together in one round trip. Its answer goes to ``begin``; a pipeline
        that failed leaves ``begin`` to run it again, which counts the delivery once."""
        keys, values = self._begin_call
        # By its digest: through the Script, each pipeline would first ask whether Redis has
        # it, a round trip more. Redis without it (restarted) answers NOSCRIPT: ``begin``.
        pipe.evalsha(self._begin_script.sha, len(keys), *keys, *values)

    @functools.cached_property
    def _begin_call(self) -> tuple[list[bytes], list[Any]]:
        b, task_id = self.runtime.binding, self.task_id
        queued_set = b.queued_set_key(str(self.envelope.get("app")), str(self.route))
        keys = [
            self.record_key,
            b.attempts_key(task_id),
            queued_set,
            b.result_key(task_id),
            self.heartbeat_key,
            b.message_key(task_id),
            b.head_key(task_id),
            b.stream_key(task_id),
        ]
        token = uuid.uuid4().hex  # this delivery's: a BEGIN tried again counts it once
        return keys, [b.expires, task_id, self.runtime.heartbeat_ms, self.channel, token]

    def _begin(self, attempts: int | None) -> None:
        task_id = self.task_id
        if attempts is None:
            keys, values = self._begin_call
            attempts = again(lambda: self._begin_script(keys=keys, args=values), "beginning a task")
        if attempts == -1:
            logger.info("task %s already has its outcome: not run again", task_id)
            raise Ignore()
        if attempts == 0:
            self.drop()
        if attempts > self.runtime.max_attempts:
            # Each earlier delivery died with its worker: stop redelivering, report a failure.
            logger.warning("task %s failed: its worker died %d times", task_id, attempts - 1)
            self.backend.mark_as_failure(task_id, AttemptsExhausted(attempts - 1))
            self.finished(_scripts.FAILED)
            raise Ignore()
        submitted = self.envelope.get("submitted")
        self.queued = time.time() - submitted if isinstance(submitted, float | int) else -1.0
        self.attempt = attempts
        # From the process that runs it: an operator sees which child began what.
        logger.info(
            "task %s started: %s, attempt %d, %.3f s after submission (request %s)",
            *(task_id, self.route, attempts, self.queued, self.rid),
        )
        self.began = time.monotonic()
        if self.runtime.hooks is not None:
            self.runtime.hooks.send(self.hook, "started", task_id, status="running")

    def start(self) -> None:
        """Hand the replay to this process's loop, under its time limit and the beater."""
        self._once("start", self._start)

    def _once(self, step: str, do: Callable[[], None]) -> None:
        """``do`` once; called again, raise what it raised the first time."""
        if step not in self._steps:
            try:
                do()
                self._steps[step] = None
            except BaseException as exc:
                self._steps[step] = exc
        error = self._steps[step]
        if error is not None:
            raise error

    def _start(self) -> None:
        rt, task_id = self.runtime, self.task_id
        app = rt.apps.get(str(self.envelope.get("app", "")))
        headers = join_headers(self.envelope["headers"], self.envelope.get("sealed"), rt.keys)
        size = _route_size(self.envelope, rt.max_response_size)

        def live(status: int, headers: list[tuple[bytes, bytes]]) -> Relay:
            return Relay(self._write_stream, status, headers, self.attempt, size)

        coro = replay(app, self.envelope, headers, size, rt.lifespan_timeout, live)
        # One wait: the beater stops a deleted task, the loop's own limit a long one; a replay
        # still running past both has blocked its loop.
        deadline = time.monotonic() + self.limit + HARD_LIMIT_GRACE / 2
        self.loop = process_loop()
        self.future = self.loop.run(coro, self.progress, self.limit)
        self.beater = process_beater(
            self.store, rt.binding, rt.cancel_check_interval, rt.heartbeat_ms
        )
        self.beat = self.beater.add(task_id, self.future, deadline)

    def progress(self, data: dict[str, Any]) -> None:
        """The endpoint's ``report_progress``: from a ``def`` endpoint's thread it writes at
        once; from the event loop, which other replays share, the process's writer does."""
        if self.beat is not None and self.beat.cancelled:
            raise TaskCancelled(f"task {self.task_id} was deleted")
        if on_event_loop():
            self.reported = True
            process_writer().put(self.task_id, lambda: self._write_progress(data))
        elif not self._write_progress(data):
            raise TaskCancelled(f"task {self.task_id} was deleted")

    def _write_progress(self, data: dict[str, Any]) -> bool:
        """Store ``data`` as the task's progress; False if the task was deleted meanwhile."""
        self.backend.store_result(self.task_id, {"progress": data}, "STARTED")
        if self.beat is not None and self.beat.cancelled:
            self.store.delete(self.runtime.binding.meta_key(self.task_id))  # raced the delete
            return False
        self.store.publish(self.channel, b"progress")
        hooks = self.runtime.hooks
        if hooks is not None and self.progress_due.due():
            hooks.send(self.hook, "progress", self.task_id, status="running", progress=data)
        return True

    def _write_stream(self, batch: bytes, head: bytes, offset: int) -> bool:
        """One batch of a streamed response (``_worker.live``), from a thread of the loop's."""
        b, task_id = self.runtime.binding, self.task_id
        keys = [self.record_key, b.result_key(task_id), b.head_key(task_id), b.stream_key(task_id)]
        values = [batch, head, b.expires, self.channel, offset]
        written = again(lambda: self._stream_script(keys=keys, args=values), "relaying a piece")
        return bool(written)

    def wait(self) -> bytes:
        """The replay's packed response, once it is done."""
        assert self.future is not None
        assert self.beat is not None
        assert self.beater is not None
        future = self.future
        try:
            return future.result(timeout=max(0.0, self.beat.deadline - time.monotonic()))
        except concurrent.futures.CancelledError:
            if self.beat.cancelled:
                self.drop()
            raise
        except TimeoutError:
            if future.done():
                raise  # the endpoint's own TimeoutError: a failure like any other
            future.cancel()
            raise LoopBlocked(
                f"the replay did not stop within its {self.limit:g} s limit"
            ) from None
        except BaseException:
            future.cancel()  # a worker shutdown: stop the replay too
            raise
        finally:
            self.beater.remove(self.task_id)
            # Every report before the outcome, which a late one would overwrite.
            if self.reported and not process_writer().flush(self.task_id, PROGRESS_FLUSH):
                logger.warning("task %s: its last progress report is not stored", self.task_id)

    def finish_in(self, pipe: Any) -> bool:
        """Queue this replay's ``FINISH`` in ``pipe`` if nothing has to come between the
        replay's end and its outcome: it answered, was not deleted, has no progress report to
        store first and no ``Retry`` policy to consult. The replay pool stores the outcomes of
        replays that end together in one round trip, then runs their traces; the answer goes
        to ``stored``, and ``finish`` takes it instead of running ``FINISH`` itself. False: not
        queued, ``finish`` runs it as on any pool."""
        future, beat, beater = self.future, self.beat, self.beater
        if future is None or beat is None or beater is None or not future.done():
            return False
        if future.cancelled() or future.exception() is not None or beat.cancelled:
            return False
        if self.reported or policy_of(self.envelope) is not None:
            return False
        beater.remove(self.task_id)  # as ``wait`` does first: no heartbeat after the outcome
        keys, values = self._early = self._finish_call(future.result())
        pipe.evalsha(self._finish_script.sha, len(keys), *keys, *values)
        return True

    def stored(self, answer: Any) -> bool:
        """``FINISH``'s answer to ``finish_in``, True if it is one: an error (NOSCRIPT, say)
        leaves ``finish`` to run it again, which stores the same outcome."""
        if isinstance(answer, int):
            self._stored = answer
        return self._stored is not None

    def finish(self, packed: bytes) -> dict[str, Any]:
        # A record deleted while the replay ran keeps nothing.
        if not self.finished(packed, self._stored, self._early):
            self.drop()
        took = time.monotonic() - self.began
        code = status_of(packed)
        logger.info(
            "task %s finished: %s %s in %.3f s, attempt %d, started %.3f s after submission "
            "(request %s)",
            *(self.task_id, self.route, code, took, self.attempt, self.queued, self.rid),
        )
        replayed(self.route, self.queued, took, str(code))
        return dict(STORED)

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            # Stored before the outcome, so that whoever reads FAILED finds the details;
            # Celery stores the same again as the task raises.
            self.backend.mark_as_failure(self.task_id, exc)
        self.finished(_scripts.FAILED)  # leave the owner's unfinished tasks
        took = time.monotonic() - self.began
        logger.info(
            "task %s failed: %s after %.3f s, attempt %d, started %.3f s after submission "
            "(request %s)",
            *(self.task_id, self.route, took, self.attempt, self.queued, self.rid),
        )
        replayed(self.route, self.queued, took, "failed")

    def drop(self) -> None:
        """Deleted, expired, or never fully submitted: nothing runs, nothing is stored."""
        b, task_id = self.runtime.binding, self.task_id
        stale = (b.meta_key(task_id), b.attempts_key(task_id), self.heartbeat_key)
        again(lambda: self.store.delete(*stale), "dropping a task")
        logger.info("task %s dropped: its record is gone (request %s)", task_id, self.rid)
        raise Ignore()

    def finished(
        self,
        outcome: bytes,
        answer: int | None = None,
        call: tuple[list[Any], list[Any]] | None = None,
    ) -> bool:
        """Store ``outcome`` (a packed response, or ``FAILED``); False if the record is gone.
        A completion webhook's delivery goes with it (``_worker.hooks``). Where the pool
        queued ``FINISH`` for this outcome (``finish_in``): ``answer``, its answer, and
        ``call``, the call to make again if there is none."""
        if answer is None:
            keys, values = call or self._finish_call(outcome)
            store = functools.partial(self._finish_script, keys=keys, args=values)
            answer = again(store, "storing an outcome")
        hooks = self.runtime.hooks
        if answer and hooks is not None:
            status, code = _ended(outcome)
            hooks.send(self.hook, "completed", self.task_id, status=status, http_status=code)
        return bool(answer)

    def _finish_call(self, outcome: bytes) -> tuple[list[Any], list[Any]]:
        """``FINISH``'s keys and arguments for ``outcome``."""
        b, task_id, hooks = self.runtime.binding, self.task_id, self.runtime.hooks
        failed = outcome == _scripts.FAILED
        head, apart = (outcome, None) if failed else split_response(outcome)
        status, code = _ended(outcome)
        message = (
            None if hooks is None else hooks.completed_message(self.hook, task_id, status, code)
        )
        ends = [
            self.record_key,
            b.result_key(task_id),
            b.owner_set_key(self.envelope.get("owner")),
            self.heartbeat_key,
            b.body_key(task_id),
            b.meta_key(task_id),
            self.record_key if message is None or hooks is None else hooks.queue_key(),
            b.head_key(task_id),
            b.stream_key(task_id),
        ]
        values = [
            head,
            b.expires,
            task_id,
            self.channel,
            b"" if apart is None else apart,
            b"" if failed else success_meta(self.backend, task_id),
            b"" if message is None else bytes(message),
        ]
        return ends, values

    def replace_blocked(self, exc: LoopBlocked) -> None:
        """A replay that blocks the loop (``time.sleep`` in an ``async def``) or a thread past
        its limit would stall every replay after it in this process: fail it, then replace the
        process (prefork: the pool starts a new one) or, where other replays share the
        process, its loop."""
        logger.error("task %s failed: %s; the blocked work is abandoned", self.task_id, exc)
        self.backend.mark_as_failure(self.task_id, ReplayTimeLimit(str(exc)))
        self.finished(_scripts.FAILED)
        if current_process().name.startswith("ForkPoolWorker"):
            logger.error(
                "replacing worker process %d, blocked by task %s", os.getpid(), self.task_id
            )
            os._exit(1)  # the redelivery finds the outcome stored and does not run again
        if self.loop is not None:
            replace_process_loop(self.loop)


def _ended(outcome: bytes) -> tuple[str, int | None]:
    """The task's state and the response's status for ``outcome``, as its events name them."""
    if outcome == _scripts.FAILED:
        return "failed", None
    return "done", status_of(outcome)


def _route_limit(envelope: dict[str, Any], default: float) -> float:
    """The route's own time limit, carried in the message, else the worker's."""
    limit = envelope.get("time_limit")
    if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
        return float(limit)
    return default


def _route_size(envelope: dict[str, Any], default: int) -> int:
    """The route's own response size limit, carried in the message, else the worker's."""
    size = envelope.get("max_response_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    return default
