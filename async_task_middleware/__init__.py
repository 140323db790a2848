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

from ._shared.binding import ConfigurationError
from ._shared.policy import SealError, header_owner
from ._shared.retry import Retry
from ._shared.routes import Route
from ._shared.webhooks import Webhooks
from ._shared.wire import WireFormatError
from ._web.middleware import AsyncTaskMiddleware
from ._web.openapi import document_tasks, tasks_openapi
from ._worker.job import AttemptsExhausted, LoopBlocked
from ._worker.loop import LifespanFailed, ReplayTimeLimit
from ._worker.pool import ReplayPool
from ._worker.progress import TaskCancelled, report_progress
from ._worker.register import register_replay
from ._worker.replay import NoResponse, ResponseTooLarge

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
    "Retry",
    "Route",
    "SealError",
    "TaskCancelled",
    "Webhooks",
    "WireFormatError",
    "document_tasks",
    "header_owner",
    "register_replay",
    "report_progress",
    "tasks_openapi",
]
