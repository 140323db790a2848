"""Submitting: a request to a marked route becomes a task, answered ``303`` (or refused).

A refusal (``503``, ``429``, ``408``, ``413``, ``401``) always means nothing was enqueued: a
submission whose outcome is unknown is settled (``TaskStore.retract``) within what is left of
``publish_timeout``, or after the answer when that is not enough, so a client that retries
after a 503 never runs the endpoint twice (docs/how-it-works.md: "A 503 promised nothing").
With ``Prefer: wait=N`` (or the route's ``wait``) a task that ends within the wait is answered
with its final response, as the status URL would serve it, and one whose response begins
streaming within the wait with that response, live to its end (``_web.live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from .._shared.binding import Binding
from .._shared.policy import split_headers
from .._shared.routes import Submit
from .._shared.types import Receive, Scope, Send
from .._shared.wire import capture_request
from .body import BodyTooLarge, content_length, fingerprint, read_body
from .events import Note
from .headers import BadIdempotencyKey, Prefer, idempotency_key, parse_prefer, request_id
from .hooks import BadRouteWebhook, BadWebhook, check_hook
from .live import serve_live
from .publish import PublishFailed, publish
from .responses import Problem, send_problem, send_response
from .settings import Settings, authorized, location
from .state import Outcome, StoreUnavailable, Submission, TaskState
from .status import answer
from .store import TaskStore
from .wait import wait_for_end

logger = logging.getLogger(__name__)

_warned_dropped = False


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
        length = content_length(scope)
    except BadIdempotencyKey as exc:
        await send_problem(send, Problem.BAD_IDEMPOTENCY_KEY, instance, detail=str(exc))
        return
    except ValueError:
        await send_problem(send, Problem.BAD_REQUEST, instance, detail="invalid Content-Length")
        return
    try:
        hook = await check_hook(headers, settings.webhooks, settings.publish_timeout, target.route)
    except BadRouteWebhook as exc:
        # The client cannot fix the route's own webhook: a 503 to retry, and a line for the
        # operator, who can.
        logger.error("the webhook of %s is refused: %s", target.spec, exc)
        await send_problem(send, Problem.UNAVAILABLE, instance, detail="try again later")
        return
    except BadWebhook as exc:
        await send_problem(send, Problem.BAD_WEBHOOK, instance, detail=str(exc))
        return
    try:
        if length is not None and length > settings.max_body_size:
            raise BodyTooLarge
        async with asyncio.timeout(settings.body_timeout):
            body = await read_body(receive, settings.max_body_size)
    except BodyTooLarge:
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
    task_id = str(uuid.uuid4())
    status_path = f"{target.location}/{task_id}"
    if hook is not None:
        # Absolute, for a receiver elsewhere: on location_base, else the request's own host.
        base = settings.location_base or "request"
        hook["location"] = location(settings, scope, status_path, base=base).decode()
        hook["route"] = target.spec
    sub = Submission(
        task_id=task_id,
        app=settings.name,
        route=target.spec,
        owner=owner,
        owner_cap=settings.max_tasks_per_owner,
        queued_cap=settings.max_queued_per_route,
        queue=route.queue,
        idempotency_key=None if key is None else binding.idempotency_key(settings.name, owner, key),
        fingerprint="" if key is None else fingerprint(scope, body),
        webhook=hook,
        path=status_path,
        listed=settings.tasks_path is not None,
    )
    envelope = capture_request(
        scope, app=sub.app, route=sub.route, owner=owner, headers=kept, sealed=sealed
    )
    if route.time_limit is not None:
        envelope["time_limit"] = route.time_limit
    if route.max_response_size is not None:
        envelope["max_response_size"] = route.max_response_size
    if hook is not None:
        envelope["webhook"] = hook
    if route.retries is not None:
        envelope["retries"] = route.retries.wire()
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
            outcome, task_id = await publish(settings, binding, store, sub, envelope, body)
        except (PublishFailed, StoreUnavailable) as exc:
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
            extra = [
                (b"content-location", status_url),
                (b"preference-applied", b"wait=%d" % wait),
            ]

            async def final(state: TaskState) -> None:
                await answer(
                    *(settings, store, send, status_path, task_id, route, state),
                    *(False, extra, status_url),
                )

            try:
                state = await wait_for_end(store, channel, task_id, wait, receive, own, live=True)
                if state is not None and state.head is not None:
                    # Its response began within the wait: served live, to its end.
                    await serve_live(
                        store, channel, task_id, send, receive, extra, None, final, own
                    )
                    return
            except StoreUnavailable:
                state = None  # the task is accepted: the client reads it at the status URL
            if state is not None and state.final and state.record is not None:
                await final(state)
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
