"""The web side: answer marked routes with 303, serve the status URLs, pass everything else."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio
import anyio.to_thread
from celery import Celery

from ._celery import TASK_NAME, Binding, ConfigurationError
from ._responses import send_json, send_problem, send_response
from ._routes import STATUS_METHODS, RouteTable, Status, Submit
from ._store import StoreUnavailable, TaskStore
from ._wire import WireFormatError, capture_request, decode_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)

#: The scope key by which a worker's replay is recognised: only code can set it, never a client.
REPLAY_KEY = "async_task_middleware.replay"

_MiB = 1024 * 1024
# Above this, building the broker message (base64 + JSON of the body) would hold the event loop
# for milliseconds: it moves to a thread.
_INLINE_MESSAGE_LIMIT = 256 * 1024

_STATUS_NAMES = {
    "PENDING": "queued",
    "RECEIVED": "queued",
    "STARTED": "running",
    "RETRY": "retrying",
}
_FAILED = frozenset({"FAILURE", "REVOKED", "REJECTED"})
_ALLOW = ", ".join(STATUS_METHODS).encode()


class _PublishFailed(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


class AsyncTaskMiddleware:
    """Runs the marked routes of an ASGI app as Celery tasks, behind the 303 / 202 / 200 protocol.

    A request to a marked route is answered at once with ``303 See Other`` and a ``Location``
    (the request path + ``/{task_id}``); a Celery worker later replays the very same request
    against the very same app (see ``register_replay``) and the status URL serves the outcome.
    The HTTP contract is in the README; the options:

    - ``celery_app``: the Celery app; its ``result_backend`` must be Redis.
    - ``routes``: ``["POST /words", "PUT /reports/{id:int}"]``, Starlette path syntax, matched
      below ``root_path`` so the middleware works inside mounts.
    - ``name``: the key under which the worker knows this app (``register_replay``).
    - ``max_body_size``: bytes; a larger body is a 413 and nothing is enqueued. 10 MiB.
    - ``publish_timeout``: seconds a submission may take before it is a 503. 2.
    - ``read_timeout``: seconds a status read may take before it is a 503. 2.
    - ``retry_after``: seconds a client is told to wait between polls. 1.
    - ``max_connections``: Redis connections per event loop; callers wait for a free one. 64.
    - ``debug``: put the exception type and message of a failed task in its 500. False.
    - ``redis_url``: the Redis of the task store; defaults to the Celery result backend.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        celery_app: Celery,
        routes: Iterable[str],
        name: str = "default",
        max_body_size: int = 10 * _MiB,
        publish_timeout: float = 2.0,
        read_timeout: float = 2.0,
        retry_after: int = 1,
        max_connections: int = 64,
        debug: bool = False,
        redis_url: str | None = None,
    ) -> None:
        for option, value in (
            ("max_body_size", max_body_size),
            ("publish_timeout", publish_timeout),
            ("read_timeout", read_timeout),
            ("retry_after", retry_after),
            ("max_connections", max_connections),
        ):
            if not value > 0:
                raise ConfigurationError(f"{option}={value!r}: it must be greater than 0")
        self.app = app
        self._routes = RouteTable(routes)
        self._binding = Binding.of(celery_app, redis_url)
        self._name = name
        self._max_body_size = max_body_size
        self._publish_timeout = publish_timeout
        self._read_timeout = read_timeout
        self._retry_after = str(retry_after).encode()
        self._max_connections = max_connections
        self._debug = debug
        # Redis connections belong to the event loop that opened them; a process normally has
        # one loop, tests and embedded servers may have several.
        self._stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TaskStore] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Every request of the app passes here: the common case, an HTTP request the
        # middleware does not own, takes one comparison, one lookup and one regex match.
        if scope["type"] == "http":
            if REPLAY_KEY not in scope:
                target = self._routes.match(scope)
                if target is not None:
                    if isinstance(target, Submit):
                        await self._submit(scope, receive, send, target)
                    else:
                        await self._status(scope, send, target)
                    return
        elif scope["type"] == "lifespan":
            send = self._closing_on_shutdown(send)
        await self.app(scope, receive, send)

    def _closing_on_shutdown(self, send: Send) -> Send:
        """The lifespan's ``send``, closing this loop's Redis connections as the app stops."""

        async def send_closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                store = self._stores.pop(asyncio.get_running_loop(), None)
                if store is not None:
                    await store.aclose()
            await send(message)

        return send_closing

    def _store(self) -> TaskStore:
        loop = asyncio.get_running_loop()
        store = self._stores.get(loop)
        if store is None:
            store = TaskStore(
                self._binding, timeout=self._read_timeout, max_connections=self._max_connections
            )
            self._stores[loop] = store
        return store

    # -- submitting ------------------------------------------------------------------------

    async def _submit(self, scope: Scope, receive: Receive, send: Send, target: Submit) -> None:
        instance = target.location
        try:
            length = _content_length(scope)
        except ValueError:
            await send_problem(send, 400, instance, detail="invalid Content-Length")
            return
        try:
            if length is not None and length > self._max_body_size:
                raise _BodyTooLarge
            body = await _read_body(receive, self._max_body_size)
        except _BodyTooLarge:
            detail = f"the body is larger than {self._max_body_size} bytes"
            await send_problem(send, 413, instance, detail=detail)
            return
        if body is None:
            return  # the client left while sending: nothing was enqueued, no one to answer

        task_id = str(uuid.uuid4())
        envelope = capture_request(scope, body, self._name)
        try:
            await self._publish(task_id, envelope)
        except (_PublishFailed, StoreUnavailable) as exc:
            logger.warning("submission to %s refused: %s", instance, type(exc).__name__)
            await send_problem(
                send,
                503,
                instance,
                detail="the task queue is unavailable; try again later",
                headers=[(b"retry-after", self._retry_after)],
            )
            return
        location = f"{target.location}/{task_id}".encode()
        await send_response(send, 303, [(b"location", location), (b"content-length", b"0")], b"")

    async def _publish(self, task_id: str, envelope: dict[str, Any]) -> None:
        store = self._store()
        record = store.record(envelope)
        binding = self._binding
        if binding.fast_queue is not None:
            build = functools.partial(binding.broker_message, task_id, envelope)
            if len(envelope["body"]) > _INLINE_MESSAGE_LIMIT:
                message = await anyio.to_thread.run_sync(build)
            else:
                message = build()
            await store.submit(task_id, record, message, timeout=self._publish_timeout)
            return
        try:
            with anyio.fail_after(self._publish_timeout):
                await self._publish_through_celery(store, task_id, record, envelope)
        except TimeoutError as exc:
            raise _PublishFailed("timeout") from exc

    async def _publish_through_celery(
        self, store: TaskStore, task_id: str, record: bytes, envelope: dict[str, Any]
    ) -> None:
        """Any other broker: Celery's blocking publish runs in a thread, record first, so
        that the worker finds it; a publish that fails or outlives the deadline takes the
        record back, and should it still land later, the worker drops it for want of one."""
        binding = self._binding
        await store.submit(task_id, record, None, timeout=self._publish_timeout)
        send_task = functools.partial(
            binding.celery_app.send_task,
            TASK_NAME,
            args=(envelope,),
            task_id=task_id,
            argsrepr="(<request>)",
            retry=False,
        )
        try:
            await anyio.to_thread.run_sync(send_task, abandon_on_cancel=True)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await store.forget(task_id)
            if isinstance(exc, Exception):
                raise _PublishFailed(type(exc).__name__) from exc
            raise

    # -- the status URL --------------------------------------------------------------------

    async def _status(self, scope: Scope, send: Send, target: Status) -> None:
        method = scope["method"]
        head = method == "HEAD"
        instance = f"{target.location}/{target.task_id}" if target.task_id else target.location
        if method not in STATUS_METHODS:
            await send_problem(send, 405, instance, headers=[(b"allow", _ALLOW)])
            return
        if target.task_id is None:
            await send_problem(send, 404, instance, head=head)
            return
        store = self._store()
        try:
            if method == "DELETE":
                if await store.delete(target.task_id):
                    await send_response(send, 204, [], b"")
                else:
                    await send_problem(send, 404, instance)
                return
            state = await store.read(target.task_id)
        except StoreUnavailable as exc:
            logger.warning("task store unavailable: %s", exc)
            await send_problem(
                send, 503, instance, headers=[(b"retry-after", self._retry_after)], head=head
            )
            return
        if not state.exists:
            await send_problem(send, 404, instance, head=head)
            return
        meta = state.meta or {}
        celery_state = meta.get("status", "PENDING")
        if celery_state == "SUCCESS":
            try:
                status, headers, body = decode_response(meta["result"])
            except (WireFormatError, KeyError, TypeError, ValueError):
                logger.error("task %s: stored response unreadable", target.task_id)
                await send_problem(send, 500, instance, head=head)
                return
            await send_response(send, status, headers, body, head=head)
        elif celery_state in _FAILED:
            detail = _failure_detail(meta) if self._debug else None
            await send_problem(send, 500, instance, detail=detail, head=head)
        else:
            result = meta.get("result")
            progress = result.get("progress") if isinstance(result, dict) else None
            await send_json(
                send,
                202,
                {
                    "task_id": target.task_id,
                    "status": _STATUS_NAMES.get(celery_state, "running"),
                    "progress": progress,
                },
                [(b"retry-after", self._retry_after), (b"cache-control", b"no-store")],
                head=head,
            )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError(value)
            return length
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _failure_detail(meta: dict[str, Any]) -> str:
    result = meta.get("result")
    if isinstance(result, dict):
        return f"{result.get('exc_type', 'Error')}: {result.get('exc_message', '')}"
    return str(meta.get("status"))
