"""The replay's result backend: one per process, and the meta Celery would store itself."""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any

from celery import Task, states

#: What the replay task returns, and Celery's meta says: the response itself is in the store.
STORED = {"v": 1, "stored": True}
_backends: dict[tuple[int, int], Any] = {}
_backends_lock = threading.Lock()


def process_backend(task: Task) -> Any:
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


def success_meta(backend: Any, task_id: str) -> Any:
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
