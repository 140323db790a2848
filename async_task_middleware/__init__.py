"""async-task-middleware: the asynchronous request-reply protocol for any ASGI app.

Mark routes as long-running; the middleware answers them with ``303 See Other``, a Celery
worker replays the request against the same app, and the status URL serves the outcome.

The exceptions, all raised at start or in the worker, never to an HTTP client::

    ConfigurationError  (ValueError)  a setting the protocol cannot work with
    AttemptsExhausted                 (stored as a task's failure) its worker died every time
    WireFormatError     (ValueError)  an envelope of an unknown version or shape
    SealError           (ValueError)  sealed headers that no configured secret_key opens
    LifespanFailed                    the app's lifespan startup failed (or timed out) in the worker
    ReplayTimeLimit                   the replay ran past its time limit and was cancelled
    LoopBlocked                       the replay blocked its event loop past the hard limit
    NoResponse                        the app returned without a response during a replay
    ResponseTooLarge                  the replayed response exceeded max_response_size
"""

from ._celery import ConfigurationError
from ._job import AttemptsExhausted, LoopBlocked
from ._loop import LifespanFailed, ReplayTimeLimit
from ._middleware import AsyncTaskMiddleware
from ._openapi import document_tasks, tasks_openapi
from ._policy import SealError, header_owner
from ._pool import ReplayPool
from ._progress import TaskCancelled, report_progress
from ._replay import NoResponse, ResponseTooLarge
from ._routes import Route
from ._wire import WireFormatError
from ._worker import register_replay

__all__ = [
    "AsyncTaskMiddleware",
    "AttemptsExhausted",
    "ConfigurationError",
    "LifespanFailed",
    "LoopBlocked",
    "NoResponse",
    "ReplayPool",
    "ReplayTimeLimit",
    "ResponseTooLarge",
    "Route",
    "SealError",
    "TaskCancelled",
    "WireFormatError",
    "document_tasks",
    "header_owner",
    "register_replay",
    "report_progress",
    "tasks_openapi",
]
