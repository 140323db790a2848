"""Submitting: a request to a marked route becomes a task, answered ``303`` (or refused).

A refusal (``503``, ``429``, ``408``, ``413``, ``401``) always means nothing was enqueued: a
submission whose outcome is unknown is settled (``TaskStore.retract``) within what is left of
``publish_timeout``, or after the answer when that is not enough, so a client that retries
after a 503 never runs the endpoint twice (README: "A 503 promised nothing").
With ``Prefer: wait=N`` (or the route's ``wait``) a task that ends within the wait is answered
with its final response, as the status URL would serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import anyio.to_thread

from ._celery import HARD_LIMIT_GRACE, TASK_NAME, Binding
from ._events import Note
from ._headers import BadIdempotencyKey, Prefer, idempotency_key, parse_prefer, request_id
from ._policy import split_headers
from ._responses import Problem, send_problem, send_response
from ._routes import Submit
from ._settings import Settings, authorized, location
from ._state import Outcome, StoreUnavailable, Submission
from ._status import answer
from ._store import TaskStore
from ._types import Receive, Scope, Send
from ._wait import wait_for_end
from ._wire import body_base64, capture_request

logger = logging.getLogger(__name__)

# Above this, building the broker message (base64 of the body) would hold the event loop for
# more than a millisecond: it moves to a thread, where it yields between 192 KiB pieces.
_INLINE_MESSAGE_LIMIT = 256 * 1024
_warned_dropped = False
# The share of ``publish_timeout`` the publish may take; the rest is the settle's.
_PUBLISH_SHARE = 0.6
# At least this long for a step, whatever came before it.
_LEAST = 0.01


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
    headers = scope.get("headers", ())
    if not await authorized(target.route, scope):
        await send_problem(send, Problem.UNAUTHORIZED, instance)
        return
    try:
        key = idempotency_key(headers)
        length = _content_length(scope)
    except BadIdempotencyKey as exc:
        await send_problem(send, Problem.BAD_IDEMPOTENCY_KEY, instance, detail=str(exc))
        return
    except ValueError:
        await send_problem(send, Problem.BAD_REQUEST, instance, detail="invalid Content-Length")
        return
    try:
        if length is not None and length > settings.max_body_size:
            raise _BodyTooLarge
        async with asyncio.timeout(settings.body_timeout):
            body = await _read_body(receive, settings.max_body_size)
    except _BodyTooLarge:
        detail = f"the body is larger than {settings.max_body_size} bytes"
        await send_problem(send, Problem.TOO_LARGE, instance, detail=detail)
        return
    except TimeoutError:
        # A client trickling its body holds a connection and memory: answer and hang up.
        detail = f"the body did not arrive within {settings.body_timeout:g} s"
        closing = [(b"connection", b"close")]
        await send_problem(send, Problem.BODY_TIMEOUT, instance, detail=detail, headers=closing)
        return
    if body is None:
        return  # the client left while sending: nothing was enqueued, no one to answer

    tags = settings.owner_tags(scope)
    kept, sealed = split_headers(headers, settings.credential_headers, settings.keys)
    if settings.keys is None:
        _warn_if_dropped(scope, settings.credential_headers)
    owner = tags[0] if tags else None
    route = target.route
    sub = Submission(
        task_id=str(uuid.uuid4()),
        app=settings.name,
        route=target.spec,
        owner=owner,
        owner_cap=settings.max_tasks_per_owner,
        queued_cap=settings.max_queued_per_route,
        queue=route.queue,
        idempotency_key=None if key is None else binding.idempotency_key(settings.name, owner, key),
        fingerprint="" if key is None else _fingerprint(scope, body),
    )
    envelope = capture_request(
        scope, app=sub.app, route=sub.route, owner=owner, headers=kept, sealed=sealed
    )
    if route.time_limit is not None:
        envelope["time_limit"] = route.time_limit
    # For the logs on both sides: the client's request id, and when the task was submitted.
    rid = request_id(headers)
    if rid is not None:
        envelope["request_id"] = rid
    envelope["submitted"] = time.time()
    prefer = parse_prefer(headers)
    wait = _wait(prefer, route.wait, settings.max_wait)
    retry_after = [(b"retry-after", b"%d" % settings.retry_after)]
    # A turn of the event loop between taking the request and publishing it: when a crowd of
    # submissions arrives at once, their work is spread over two turns, and whatever else the
    # loop serves (timers, other routes) waits half as long.
    await asyncio.sleep(0)
    async with _listening(store, binding, sub.task_id, wait) as notes:
        try:
            outcome, task_id = await _publish(settings, binding, store, sub, envelope, body)
        except (_PublishFailed, StoreUnavailable) as exc:
            logger.warning("submission to %s refused: %s", instance, type(exc).__name__)
            detail = "the task queue is unavailable; try again later"
            await send_problem(
                send, Problem.UNAVAILABLE, instance, detail=detail, headers=retry_after
            )
            return
        if outcome is Outcome.OWNER_FULL:
            detail = f"you have {settings.max_tasks_per_owner} unfinished tasks; wait for one"
            await send_problem(
                send, Problem.TOO_MANY_TASKS, instance, detail=detail, headers=retry_after
            )
            return
        if outcome is Outcome.QUEUE_FULL:
            detail = "the task queue of this route is full; try again later"
            await send_problem(
                send, Problem.QUEUE_FULL, instance, detail=detail, headers=retry_after
            )
            return
        if outcome is Outcome.CONFLICT:
            detail = "this Idempotency-Key was used with another request"
            await send_problem(send, Problem.IDEMPOTENCY_CONFLICT, instance, detail=detail)
            return
        if outcome is Outcome.REFUSED:
            await send_problem(send, Problem.UNAVAILABLE, instance, headers=retry_after)
            return
        if outcome is Outcome.ACCEPTED:
            logger.info("task %s submitted: %s (request %s)", task_id, sub.route, rid or "-")
        status_path = f"{target.location}/{task_id}"
        status_url = location(settings, scope, status_path)
        if wait:
            channel = binding.events_channel(task_id)
            own = notes if task_id == sub.task_id else None  # a duplicate: listen to the first
            try:
                state = await wait_for_end(store, channel, task_id, wait, receive, own)
            except StoreUnavailable:
                state = None  # the task is accepted: the client reads it at the status URL
            if state is not None and state.final and state.record is not None:
                extra = [
                    (b"content-location", status_url),
                    (b"preference-applied", b"wait=%d" % wait),
                ]
                await answer(
                    settings,
                    store,
                    send,
                    status_path,
                    task_id,
                    route,
                    state,
                    False,
                    extra,
                    status_url,
                )
                return
    headers_out = [(b"location", status_url), (b"content-length", b"0")]
    if prefer.respond_async:
        headers_out.append((b"preference-applied", b"respond-async"))
    if settings.submit_status == 202:
        headers_out.append((b"retry-after", b"%d" % (route.retry_after or 1)))
    await send_response(send, settings.submit_status, headers_out, b"")


def _wait(prefer: Prefer, route_wait: float | None, max_wait: float) -> int:
    """Whole seconds to wait before the 303: the client's ``Prefer`` first, then the route's,
    capped; ``respond-async`` means none."""
    if prefer.respond_async:
        return 0
    wanted = prefer.wait if prefer.wait is not None else route_wait
    return int(min(wanted, max_wait)) if wanted else 0


@contextlib.asynccontextmanager
async def _listening(
    store: TaskStore, binding: Binding, task_id: str, wait: int
) -> AsyncIterator[asyncio.Queue[Note] | None]:
    """The task's subscription, opened before the task exists, so that no note is missed."""
    if not wait:
        yield None
        return
    async with store.events.listen(binding.events_channel(task_id), 1.0) as notes:
        yield notes


def _fingerprint(scope: Scope, body: bytearray) -> str:
    """What makes two requests "the same" for an idempotency key: method, path, query and the
    body (the owner is in the key's own name). A ``multipart/form-data`` body counts by its
    parts, not its boundary: a client that builds the form again for its retry picks a new
    boundary, and that retry is the same request. Any other body counts by its bytes."""
    digest = hashlib.sha256()
    for part in (scope["method"].encode(), scope.get("raw_path") or scope["path"].encode()):
        digest.update(part + b"\0")
    digest.update(scope.get("query_string", b"") + b"\0")
    boundary = _multipart_boundary(scope.get("headers", ()))
    if boundary is None:
        digest.update(body)
        return digest.hexdigest()
    # The parts between the delimiters, each behind its length, so that no two different
    # sequences of parts hash alike; hashed from a view, without copying the body.
    digest.update(b"multipart/form-data\0")
    view, delimiter, start = memoryview(body), b"--" + boundary, 0
    while True:
        end = body.find(delimiter, start)
        piece = view[start:] if end < 0 else view[start:end]
        digest.update(b"%d:" % len(piece))
        digest.update(piece)
        if end < 0:
            return digest.hexdigest()
        start = end + len(delimiter)


# RFC 2046 5.1.1: 1 to 70 of these, the last not a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def _multipart_boundary(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The boundary of a ``multipart/form-data`` request, None for any other (or a malformed
    or repeated content type, whose body then counts by its bytes)."""
    values = [value for name, value in headers if name == b"content-type"]
    if len(values) != 1:
        return None
    media, *params = values[0].split(b";")
    if media.strip().lower() != b"multipart/form-data":
        return None
    found = None
    for param in params:
        name, sep, value = param.partition(b"=")
        if sep and name.strip().lower() == b"boundary":
            if found is not None:
                return None
            value = value.strip()
            if len(value) >= 2 and value[:1] == value[-1:] == b'"':
                value = value[1:-1]
            found = value
    return found if found is not None and _BOUNDARY.fullmatch(found) else None


async def _publish(
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
    except (_PublishFailed, StoreUnavailable):
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
    names = {name.decode("latin-1") for name, _ in scope.get("headers", ()) if name in credentials}
    if names:
        _warned_dropped = True
        logger.warning(
            "credential headers (%s) are not passed to the worker: give the middleware and "
            "register_replay() a secret_key to carry them encrypted",
            ", ".join(sorted(names)),
        )
