"""What a worker settles once for every delivery of the replay task, and the task's body."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from .._shared import scripts as _scripts
from .._shared.binding import Binding
from .._shared.policy import Keys
from .apps import Apps
from .hooks import HookSender
from .job import Job, LoopBlocked
from .retries import retry_if_asked


@dataclass
class Runtime:
    """What ``register_replay`` settles once for every delivery of its task."""

    binding: Binding
    apps: Apps
    keys: Keys | None
    max_attempts: int
    time_limit: float
    max_response_size: int
    lifespan_timeout: float
    cancel_check_interval: float
    heartbeat_ms: int
    hooks: HookSender | None = None

    def __post_init__(self) -> None:
        self._scripts: dict[int, tuple[Any, Any, Any]] = {}
        # The delivery the replay pool began, for the trace it runs next on this thread.
        self._handed = threading.local()

    def hand(self, job: Job | None) -> None:
        """``job`` for the task body that runs next on this thread (None: none)."""
        self._handed.job = job

    def scripts(self, store: Any) -> tuple[Any, Any, Any]:
        if id(store) not in self._scripts:
            self._scripts[id(store)] = (
                store.register_script(_scripts.BEGIN),
                store.register_script(_scripts.FINISH),
                store.register_script(_scripts.STREAM),
            )
        return self._scripts[id(store)]

    def run(self, task: Task, envelope: Any) -> dict[str, Any]:
        """The task's body: a delivery begun by the replay pool is taken up where it is."""
        job: Job | None = getattr(self._handed, "job", None)
        if job is None or job.task_id != task.request.id:
            job = Job(self, task, task.request.id, envelope)
        job.begin()
        try:
            job.start()
            packed = job.wait()
        except Ignore:
            raise
        except LoopBlocked as exc:
            job.replace_blocked(exc)
            raise
        except BaseException as exc:
            if isinstance(exc, Exception):
                retry_if_asked(job, exc, None)  # raises Celery's Retry when the policy says so
            job.fail(exc)
            raise
        retry_if_asked(job, None, packed)
        return job.finish(packed)
