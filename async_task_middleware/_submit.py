"""Submitting: a request to a marked route becomes a task, answered ``303`` (or refused).

A refusal (``503``, ``429``, ``408``, ``413``, ``401``) always means nothing was enqueued: a
submission whose outcome is unknown when its deadline passes is settled before the answer
(``TaskStore.retract``), so a client that retries after a 503 never runs the endpoint twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import Any

import anyio
import anyio.to_thread

from ._celery import TASK_NAME, Binding
from ._policy import split_headers
from ._responses import send_problem, send_response
from ._routes import Submit
from ._settings import Settings, authorized
from ._store import Outcome, StoreUnavailable, Submission, TaskStore
from ._types import Receive, Scope, Send
from ._wire import body_base64, capture_request

logger = logging.getLogger(__name__)

# Above this, building the broker message (base64 of the body) would hold the event loop for
# more than a millisecond: it moves to a thread, where it yields between 192 KiB pieces.
_INLINE_MESSAGE_LIMIT = 256 * 1024
_warned_dropped = False


class _BodyTooLarge(Exception):
    pass


class _PublishFailed(Exception):
    pass


async def submit(
    settings: Settings,
    binding: Binding,
    store: TaskStore,
    scope: Scope,
    receive: Receive,
    send: Send,
    target: Submit,
) -> None:
    instance = target.location
    if not await authorized(target.route, scope):
        await send_problem(send, 401, instance)
        return
    try:
        length = _content_length(scope)
    except ValueError:
        await send_problem(send, 400, instance, detail="invalid Content-Length")
        return
    try:
        if length is not None and length > settings.max_body_size:
            raise _BodyTooLarge
        async with asyncio.timeout(settings.body_timeout):
            body = await _read_body(receive, settings.max_body_size)
    except _BodyTooLarge:
        detail = f"the body is larger than {settings.max_body_size} bytes"
        await send_problem(send, 413, instance, detail=detail)
        return
    except TimeoutError:
        # A client trickling its body holds a connection and memory: answer and hang up.
        detail = f"the body did not arrive within {settings.body_timeout:g} s"
        await send_problem(send, 408, instance, detail=detail, headers=[(b"connection", b"close")])
        return
    if body is None:
        return  # the client left while sending: nothing was enqueued, no one to answer

    tags = settings.owner_tags(scope)
    headers, sealed = split_headers(
        scope.get("headers", ()), settings.credential_headers, settings.keys
    )
    if settings.keys is None:
        _warn_if_dropped(scope, settings.credential_headers)
    sub = Submission(
        task_id=str(uuid.uuid4()),
        app=settings.name,
        route=target.spec,
        owner=tags[0] if tags else None,
        owner_cap=settings.max_tasks_per_owner,
        queued_cap=settings.max_queued_per_route,
    )
    envelope = capture_request(
        scope, app=sub.app, route=sub.route, owner=sub.owner, headers=headers, sealed=sealed
    )
    try:
        outcome = await _publish(settings, binding, store, sub, envelope, body)
    except (_PublishFailed, StoreUnavailable) as exc:
        logger.warning("submission to %s refused: %s", instance, type(exc).__name__)
        outcome = None
    retry_after = [(b"retry-after", settings.retry_after)]
    if outcome is Outcome.ACCEPTED:
        location = f"{target.location}/{sub.task_id}".encode()
        await send_response(send, 303, [(b"location", location), (b"content-length", b"0")], b"")
    elif outcome is Outcome.OWNER_FULL:
        detail = f"you have {settings.max_tasks_per_owner} unfinished tasks; wait for one to end"
        await send_problem(send, 429, instance, detail=detail, headers=retry_after)
    elif outcome is Outcome.QUEUE_FULL:
        detail = "the task queue of this route is full; try again later"
        await send_problem(send, 503, instance, detail=detail, headers=retry_after)
    else:
        detail = "the task queue is unavailable; try again later"
        await send_problem(send, 503, instance, detail=detail, headers=retry_after)


async def _publish(
    settings: Settings,
    binding: Binding,
    store: TaskStore,
    sub: Submission,
    envelope: dict[str, Any],
    body: bytearray,
) -> Outcome:
    try:
        if binding.fast_queue is not None:
            build = functools.partial(binding.broker_message, sub.task_id, envelope, body)
            if len(body) > _INLINE_MESSAGE_LIMIT:
                message = await anyio.to_thread.run_sync(build)
            else:
                message = build()
            body.clear()  # the message holds it now: one copy per request, not two
            return await store.submit(sub, message, timeout=settings.publish_timeout)
        outcome = await store.submit(sub, None, timeout=settings.publish_timeout)
        if outcome is Outcome.ACCEPTED:
            envelope["body"] = body_base64(body).decode("ascii")
            body.clear()
            await _publish_through_celery(settings, binding, sub.task_id, envelope)
        return outcome
    except (_PublishFailed, StoreUnavailable):
        # The script (or Celery's publish) may still land after its deadline: settle it now.
        with anyio.CancelScope(shield=True):
            if await store.retract(sub):
                return Outcome.ACCEPTED  # a worker already began it: it was accepted
        raise


async def _publish_through_celery(
    settings: Settings, binding: Binding, task_id: str, envelope: dict[str, Any]
) -> None:
    """Any other broker: Celery's blocking publish runs in a thread, after the record, so that
    the worker finds it; one that fails or outlives the deadline is retracted by the caller,
    and should it still land later, the worker drops it for want of a record."""
    send_task = functools.partial(
        binding.celery_app.send_task,
        TASK_NAME,
        args=(envelope,),
        task_id=task_id,
        argsrepr="(<request>)",
        retry=False,
    )
    try:
        with anyio.fail_after(settings.publish_timeout):
            await anyio.to_thread.run_sync(send_task, abandon_on_cancel=True)
    except Exception as exc:
        raise _PublishFailed(type(exc).__name__) from exc


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            # Digits only (RFC 9110): int() would also take '+5', ' 5' and '1_0'.
            if not value.isdigit():
                raise ValueError(value)
            return int(value)
    return None


async def _read_body(receive: Receive, limit: int) -> bytearray | None:
    """The whole body, or None when the client disconnected first."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise _BodyTooLarge
        if not message.get("more_body", False):
            return body


def _warn_if_dropped(scope: Scope, credentials: frozenset[bytes]) -> None:
    global _warned_dropped
    if _warned_dropped:
        return
    names = sorted(
        {name.decode("latin-1") for name, _ in scope.get("headers", ()) if name in credentials}
    )
    if names:
        _warned_dropped = True
        logger.warning(
            "credential headers (%s) are not passed to the worker: give the middleware and "
            "register_replay() a secret_key to carry them encrypted",
            ", ".join(sorted(names)),
        )
