"""Publishing a submission: the record and the task message, within ``publish_timeout``.

With the native Redis broker the submit script writes both at once; with any other, Celery's
publish follows the record. An outcome the deadline leaves unknown is settled
(``TaskStore.settle``) before the answer, or after it when the deadline is too close, so that a
503 means nothing runs.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import anyio
import anyio.to_thread

from .._shared.binding import HARD_LIMIT_GRACE, TASK_NAME, Binding
from .._shared.wire import body_base64
from .settings import Settings
from .state import Outcome, StoreUnavailable, Submission
from .store import TaskStore

# Above this, building the broker message (base64 of the body) would hold the event loop for
# more than a millisecond: it moves to a thread, where it yields between 192 KiB pieces.
_INLINE_MESSAGE_LIMIT = 256 * 1024
# The share of ``publish_timeout`` the publish may take; the rest is the settle's.
_PUBLISH_SHARE = 0.6
# At least this long for a step, whatever came before it.
_LEAST = 0.01


class PublishFailed(Exception):
    pass


async def publish(
    settings: Settings,
    binding: Binding,
    store: TaskStore,
    sub: Submission,
    envelope: dict[str, Any],
    body: bytearray,
) -> tuple[Outcome, str]:
    route_limit = envelope.get("time_limit")
    loop = asyncio.get_running_loop()
    # The whole submission, settling included, answers within publish_timeout: the publish
    # has its share, and the rest is kept for the settle.
    end = loop.time() + settings.publish_timeout
    publish_end = end - settings.publish_timeout * (1 - _PUBLISH_SHARE)

    def left() -> float:
        return max(publish_end - loop.time(), _LEAST)

    try:
        if binding.messages is not None:
            # A route's own limit; Celery's hard limit, the prefork pool's last resort, after.
            build = functools.partial(
                binding.messages.build,
                sub.task_id,
                envelope,
                body,
                queue=sub.queue,
                time_limit=None if route_limit is None else route_limit + 2 * HARD_LIMIT_GRACE,
            )
            if len(body) > _INLINE_MESSAGE_LIMIT:
                message = await anyio.to_thread.run_sync(build)
            else:
                message = build()
            body.clear()  # the message holds it now: one copy per request, not two
            return await store.submit(sub, message, timeout=left(), replicas=settings.replicas)
        outcome, task_id = await store.submit(sub, None, timeout=left(), replicas=settings.replicas)
        if outcome is Outcome.ACCEPTED:
            envelope["body"] = body_base64(body).decode("ascii")
            body.clear()
            await _publish_through_celery(binding, sub, envelope, left())
        return outcome, task_id
    except (PublishFailed, StoreUnavailable):
        # The script may have run with its answer lost, or Celery's publish may still land:
        # settle it, within what is left of the deadline.
        if await store.settle(sub, end - loop.time()):
            return Outcome.ACCEPTED, sub.task_id  # a worker already began it
        raise


async def _publish_through_celery(
    binding: Binding, sub: Submission, envelope: dict[str, Any], timeout: float
) -> None:
    """Any other broker: Celery's blocking publish runs in a thread, after the record, so that
    the worker finds it; one that fails or outlives the deadline is retracted by the caller,
    and should it still land later, the worker drops it for want of a record."""
    options: dict[str, Any] = {}
    if sub.queue is not None:
        options["queue"] = sub.queue
    send_task = functools.partial(
        binding.celery_app.send_task,
        TASK_NAME,
        args=(envelope,),
        task_id=sub.task_id,
        argsrepr=repr((sub.route,)),  # what Flower shows: "POST /words", never the body
        ignore_result=True,  # the worker writes Celery's result meta with the outcome
        retry=False,
        **options,
    )
    try:
        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(send_task, abandon_on_cancel=True)
    except Exception as exc:
        raise PublishFailed(type(exc).__name__) from exc
