"""A replay's webhook events, handed to the delivery task (``_worker.deliver``).

``completed`` is the durable one: on the native Redis broker its message is pushed by the
end-of-task script itself (``FINISH``), with the outcome; elsewhere it is published right after.
``started`` is published as a worker begins the task, ``progress`` at most once a second per
task: a report within a second of the last one sent is not sent, and the next one after it
carries the progress as it is then.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .._shared.binding import Binding
from .._shared.message import MessageTemplates
from .._shared.webhooks import DELIVER_TASK, Webhooks, event, publish, wants

logger = logging.getLogger(__name__)

#: At most one progress delivery a second per task.
PROGRESS_INTERVAL = 1.0


class HookSender:
    def __init__(self, binding: Binding, webhooks: Webhooks) -> None:
        self._binding = binding
        self.webhooks = webhooks
        self._native = binding.fast_queue is not None
        self._templates = MessageTemplates(binding.celery_app, DELIVER_TASK, webhooks.queue)

    def completed_message(
        self, hook: dict[str, Any] | None, task_id: str, status: str, http_status: int | None
    ) -> bytearray | None:
        """The ``completed`` delivery's message for the end-of-task script, None when there
        is none to push there (no webhook, or a broker the script cannot reach)."""
        if not self._native or not wants(hook, "completed"):
            return None
        assert hook is not None
        sent = event("completed", hook, task_id, status=status, http_status=http_status)
        message_id = f"{task_id}-completed-{time.time_ns()}"
        return self._templates.build(message_id, sent, b"", queue=self.webhooks.queue)

    def queue_key(self) -> str:
        return self.webhooks.queue

    def send(self, hook: dict[str, Any] | None, kind: str, task_id: str, **data: Any) -> None:
        """Publish one event's delivery through Celery (blocking: a worker thread's call)."""
        if not wants(hook, kind) or (kind == "completed" and self._native):
            return
        assert hook is not None
        sent = event(kind, hook, task_id, **data)
        try:
            publish(self._binding.celery_app, self.webhooks.queue, sent)
        except Exception as exc:  # the replay's outcome matters more than its event
            logger.warning("task %s: its %s webhook was not sent: %s", task_id, kind, exc)


class ProgressThrottle:
    """Whether a progress report goes out now: at most one a second, the latest winning."""

    def __init__(self) -> None:
        self._last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL:
            return False
        self._last = now
        return True
