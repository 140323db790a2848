"""A route's retries, in the worker: a replay that failed as the route's ``Retry`` policy names
runs again after the backoff (``_shared.retry``)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .._shared.deployment import again
from .._shared.metrics import replayed
from .._shared.retry import matches, policy_of, retry_delay
from .._shared.wire import unpack_response
from .job import Job

logger = logging.getLogger(__name__)


def retry_if_asked(job: Job, exc: Exception | None, packed: bytes | None) -> None:
    """Run the task again after the backoff when the route's ``Retry`` policy asks for it
    (``_shared.retry``): this delivery is not counted as a worker's death, the status says
    ``retrying`` with the attempt and the time of the next, and Celery's ``retry`` puts the
    message back on the broker with its countdown. A task deleted meanwhile is dropped."""
    policy = policy_of(job.envelope)
    if policy is None:
        return
    done = job.task.request.retries + 1  # attempts made, this one included
    status = None if packed is None else unpack_response(packed)[0]
    if done >= policy["attempts"] or not matches(policy, exc, status):
        return
    delay = retry_delay(policy, done - 1)
    b, task_id = job.runtime.binding, job.task_id
    note = json.dumps({"attempt": done + 1, "of": policy["attempts"], "at": time.time() + delay})

    def settle() -> Any:
        with job.store.pipeline(transaction=True) as pipe:
            pipe.exists(job.record_key)
            pipe.decr(b.attempts_key(task_id))  # a retry, not a worker's death
            pipe.delete(job.heartbeat_key)
            pipe.set(b.retry_key(task_id), note, ex=b.expires)
            pipe.publish(job.channel, b"retrying")
            return pipe.execute()[0]

    if not again(settle, "scheduling a retry"):
        job.drop()  # deleted while it ran: nothing more
    reason = type(exc).__name__ if exc is not None else f"answered {status}"
    logger.info(
        "task %s retrying: %s, attempt %d of %d %s; again in %.1f s (request %s)",
        *(task_id, job.route, done, policy["attempts"], reason, delay, job.rid),
    )
    replayed(job.route, job.queued, time.monotonic() - job.began, "retrying")
    raise job.task.retry(countdown=delay, max_retries=policy["attempts"])
