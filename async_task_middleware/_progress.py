"""Progress reports from inside an endpoint, shown in the 202 body while the task runs."""

from __future__ import annotations

import contextvars
import logging
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
    can call it unconditionally. It writes to the result backend synchronously: call it at a
    human pace (a few times a second at most), not in a tight loop.

    In a task that was deleted meanwhile it raises ``TaskCancelled`` instead: a ``def``
    endpoint, which runs in a thread no one can stop, stops there. One that never reports
    progress runs to its end, and its result is discarded.
    """
    reporter = _reporter.get()
    if reporter is not None:
        reporter(progress)
