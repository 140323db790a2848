"""Progress reports from inside an endpoint, shown in the 202 body while the task runs."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_reporter: contextvars.ContextVar[Callable[[dict[str, Any]], None] | None] = contextvars.ContextVar(
    "async_task_middleware_progress", default=None
)


class TaskCancelled(BaseException):
    """Raised by ``report_progress`` in a task that was deleted (a ``DELETE`` on its status
    URL) while it ran: the stop point of a ``def`` endpoint, whose thread cannot be cancelled
    from outside. A ``BaseException``, like ``asyncio.CancelledError``, so that an endpoint's
    ``except Exception`` does not swallow it."""


def reporting_to(reporter: Callable[[dict[str, Any]], None] | None) -> None:
    _reporter.set(reporter)


def report_progress(**progress: Any) -> None:
    """Record the progress of the running task, e.g. ``report_progress(done=3, total=10)``.

    The keyword arguments (JSON values) become the ``progress`` object of the status URL's 202
    body. Outside a worker's replay (a plain request, a test) it does nothing, so an endpoint
    can call it unconditionally. Call it at a human pace (a few times a second at most), not in
    a tight loop: from a ``def`` endpoint it writes to the result backend before it returns;
    from an ``async def`` endpoint it returns at once and the worker's progress thread writes
    it (never the event loop, which other replays may share), a newer report replacing one not
    yet written, and every report is written before the task's outcome.

    In a task that was deleted meanwhile it raises ``TaskCancelled`` instead: a ``def``
    endpoint, which runs in a thread no one can stop, stops there. One that never reports
    progress runs to its end, and its result is discarded.
    """
    reporter = _reporter.get()
    if reporter is not None:
        reporter(progress)


def on_event_loop() -> bool:
    """True in a coroutine (an ``async def`` endpoint), False in a thread (a ``def`` one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Writer:
    """Writes progress reports off the event loop: one thread per process, in order. A task's
    report not yet written is replaced by its newest, so a slow Redis delays reports instead
    of queueing them without bound."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._changed = threading.Condition()
        self._pending: dict[str, Callable[[], object]] = {}  # oldest first
        self._writing: str | None = None
        thread = threading.Thread(target=self._run, name="async-task-middleware-progress")
        thread.daemon = True  # its writes are flushed by their tasks, before their outcome
        thread.start()

    def put(self, task_id: str, write: Callable[[], object]) -> None:
        with self._changed:
            self._pending[task_id] = write
            self._changed.notify_all()

    def flush(self, task_id: str, timeout: float) -> bool:
        """Wait until ``task_id``'s reports are written; False if that took over ``timeout``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: task_id not in self._pending and self._writing != task_id, timeout
            )

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending))
                task_id = next(iter(self._pending))
                write = self._pending.pop(task_id)
                self._writing = task_id
            try:
                write()
            except Exception:  # the next report, or the outcome, follows
                logger.warning("progress of task %s not stored", task_id, exc_info=True)
            finally:
                with self._changed:
                    self._writing = None
                    self._changed.notify_all()


_writer: Writer | None = None
_writer_lock = threading.Lock()


def process_writer() -> Writer:
    """This process's writer, started on first use (so that a forked pool child starts its own)."""
    global _writer
    with _writer_lock:
        if _writer is None or _writer.pid != os.getpid():
            _writer = Writer()
        return _writer
