"""The status URL: ``GET``/``HEAD`` read a task, ``DELETE`` cancels it, for its owner only.

A task owned by someone else, an unknown one and a malformed id get the very same 404: the
status URL reveals nothing to whoever does not own the task. ``Prefer: wait=N`` makes a ``GET``
a long poll (``_web.wait``); ``Accept: text/event-stream`` an event stream (``_web.stream``).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Any

from .._shared.binding import Binding
from .._shared.routes import STATUS_METHODS, Route, Status
from .._shared.types import Receive, Scope, Send
from .._shared.webhooks import wants
from .._shared.wire import WireFormatError, unpack_response
from .headers import ByteRange, parse_prefer, parse_range
from .hooks import send_cancelled
from .live import serve_live
from .responses import Problem, send_json, send_problem, send_response
from .settings import Settings, authorized, location
from .state import StoreUnavailable, TaskState
from .store import TaskStore
from .stream import stream_events, wants_event_stream
from .wait import wait_for_end

logger = logging.getLogger(__name__)

_ALLOW = ", ".join(STATUS_METHODS).encode()
#: However old a task, a client need not wait longer than this between polls.
RETRY_AFTER_CAP = 30

Headers = Sequence[tuple[bytes, bytes]]


def may_see(record: dict[str, Any], tags: Sequence[str]) -> bool:
    """An anonymous task is anyone's (its status URL is the capability); an owned one only
    its owner's, under any of the configured keys."""
    owner = record.get("owner")
    if owner is None:
        return True
    return any(hmac.compare_digest(str(owner), tag) for tag in tags)


async def status(
    settings: Settings,
    binding: Binding,
    store: TaskStore,
    scope: Scope,
    receive: Receive,
    send: Send,
    target: Status,
) -> None:
    method = scope["method"]
    head = method == "HEAD"
    instance = target.instance
    if method not in STATUS_METHODS:
        await send_problem(send, Problem.METHOD_NOT_ALLOWED, instance, headers=[(b"allow", _ALLOW)])
        return
    if not await authorized(target.route, scope):
        await send_problem(send, Problem.UNAUTHORIZED, instance, head=head)
        return
    task_id = target.task_id
    if task_id is None:
        await send_problem(send, Problem.NOT_FOUND, instance, head=head)
        return
    tags = settings.owner_tags(scope)
    extra: list[tuple[bytes, bytes]] = []
    try:
        if method == "DELETE":
            deleted, hook = await store.delete(task_id, tags)
            if deleted:
                await send_response(send, 204, [], b"")
                if hook is not None and wants(hook, "completed"):
                    await send_cancelled(binding, settings, hook, task_id)
            else:
                await send_problem(send, Problem.NOT_FOUND, instance)
            return
        if method == "GET" and wants_event_stream(scope):
            state = await store.read(task_id)
            if state.record is None or not may_see(state.record, tags):
                await send_problem(send, Problem.NOT_FOUND, instance)
                return
            # The stream reads the state again once subscribed: a change between this check
            # of ownership and the subscription would otherwise never be sent.
            channel = binding.events_channel(task_id)
            await stream_events(store, channel, task_id, instance, scope, receive, send)
            return
        headers = scope.get("headers", ())
        wait = parse_prefer(headers).wait
        wanted = parse_range(headers) if method == "GET" else None
        # Long polls arrive in crowds: their reads are batched (``TaskStore.read_batched``).
        state = await (store.read_batched(task_id) if wait else store.read(task_id))
        visible = state.record is not None and may_see(state.record, tags)
        channel = binding.events_channel(task_id)
        if visible and wait and not state.final and state.head is None:
            seconds = min(wait, settings.max_wait)
            live = method == "GET"
            waited = await wait_for_end(store, channel, task_id, seconds, receive, live=live)
            if waited is None:
                return  # the client left: no one to answer
            state = waited
            extra.append((b"preference-applied", b"wait=%d" % seconds))
        self_url = location(settings, scope, f"{target.location}/{task_id}")
        if visible and method == "GET" and (wait or wanted) and state.head is not None:
            # Its response has begun: served live, from its first byte (or the range's).

            async def final(ended: TaskState) -> None:
                await answer(
                    *(settings, store, send, instance, task_id, target.route, ended),
                    *(False, extra, self_url, wanted),
                )

            await serve_live(store, channel, task_id, send, receive, extra, wanted, final)
            return
    except StoreUnavailable as exc:
        logger.warning("task store unavailable: %s", exc)
        unavailable = [(b"retry-after", b"%d" % settings.retry_after)]
        await send_problem(send, Problem.UNAVAILABLE, instance, headers=unavailable, head=head)
        return
    if state.record is None or not may_see(state.record, tags):
        await send_problem(send, Problem.NOT_FOUND, instance, head=head)
        return
    await answer(
        *(settings, store, send, instance, task_id, target.route, state),
        *(head, extra, self_url, wanted),
    )


async def answer(
    settings: Settings,
    store: TaskStore,
    send: Send,
    instance: str,
    task_id: str,
    route: Route,
    state: TaskState,
    head: bool,
    extra: Headers,
    status_url: bytes,
    wanted: ByteRange | None = None,
) -> None:
    """What the status URL serves for a task in ``state``: its response (``wanted``: a range
    of it, for a 200), its failure, or 202 (with ``Location``: the status URL itself, which
    generic pollers follow while 202)."""
    hook = state.webhook
    if state.outcome is not None and hook is not None and hook.get("event") == "completed":
        # The completion webhook's delivery, beside the final answer: ``state; attempts=N``
        # (an earlier event's delivery does not count: the 202 body showed that one).
        note = f"{hook.get('state')}; attempts={hook.get('attempts')}".encode("ascii", "replace")
        extra = [*extra, (b"webhook-delivery", note)]
    if state.failed:
        detail = _failure_detail(state.meta or {}) if settings.debug else None
        await send_problem(send, Problem.FAILED, instance, detail=detail, headers=extra, head=head)
    elif state.outcome is not None:
        try:
            code, headers, body = unpack_response(state.outcome)
        except WireFormatError:
            logger.error("task %s: stored response unreadable", task_id)
            await send_problem(send, Problem.FAILED, instance, headers=extra, head=head)
            return
        length = len(body) if body is not None else _length(headers)
        span = (0, length - 1)
        if wanted is not None and code == 200:
            resolved = wanted.resolve(length)
            if resolved is None:
                unsatisfiable = [(b"content-range", b"bytes */%d" % length), *extra]
                await send_problem(
                    send, Problem.RANGE_NOT_SATISFIABLE, instance, headers=unsatisfiable, head=head
                )
                return
            span, code = resolved, 206
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            headers.append((b"content-length", b"%d" % (span[1] - span[0] + 1)))
            headers.append((b"content-range", b"bytes %d-%d/%d" % (*span, length)))
        if body is None and not head:
            await _send_apart(
                settings, store, send, instance, task_id, code, [*headers, *extra], span
            )
        else:
            piece = (body or b"")[span[0] : span[1] + 1]
            await send_response(send, code, [*headers, *extra], piece, head=head)
    else:
        assert state.record is not None
        await send_json(
            send,
            202,
            state.summary(task_id),
            [
                (b"retry-after", retry_after(route.retry_after or 1, state.record)),
                (b"cache-control", b"no-store"),
                (b"location", status_url),
                *extra,
            ],
            head=head,
        )


async def _send_apart(
    settings: Settings,
    store: TaskStore,
    send: Send,
    instance: str,
    task_id: str,
    code: int,
    headers: list[tuple[bytes, bytes]],
    span: tuple[int, int],
) -> None:
    """A large body (bytes ``span[0]`` to ``span[1]``), sent piece by piece as it is read.
    The first piece is read before the answer starts, so that a failure then is still a clean
    503; one later (the task deleted while it is sent, Redis lost) can only end the response
    short, and the server closes the connection."""
    async with contextlib.aclosing(store.body(task_id, span[1] + 1, span[0])) as pieces:
        try:
            piece = await anext(pieces, b"")
        except StoreUnavailable as exc:
            logger.warning("task %s: result body unavailable: %s", task_id, exc)
            unavailable = [(b"retry-after", b"%d" % settings.retry_after)]
            await send_problem(send, Problem.UNAVAILABLE, instance, headers=unavailable)
            return
        await send({"type": "http.response.start", "status": code, "headers": headers})
        try:
            async for following in pieces:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                piece = following
        except StoreUnavailable as exc:
            logger.warning("task %s: result body cut short: %s", task_id, exc)
            return
        await send({"type": "http.response.body", "body": piece})


def _length(headers: list[tuple[bytes, bytes]]) -> int:
    return int(next((v for n, v in headers if n == b"content-length"), b"0"))


def retry_after(base: int, record: dict[str, Any]) -> bytes:
    """Short for young tasks, longer for old ones: a tenth of the task's age, at least the
    route's base, at most 30 s (or the base, when that is longer). Never 0."""
    created = record.get("created")
    age = time.time() - created if isinstance(created, int | float) else 0.0
    return b"%d" % min(max(base, RETRY_AFTER_CAP), max(base, int(age / 10)))


def _failure_detail(meta: dict[str, Any]) -> str:
    result = meta.get("result")
    if isinstance(result, dict):
        return f"{result.get('exc_type', 'Error')}: {result.get('exc_message', '')}"
    return str(meta.get("status"))
