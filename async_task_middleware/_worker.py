"""The worker side: the Celery task that replays a captured request against the app.

Each worker process keeps one event loop in a thread of its own for its whole life (a loop per
task would strand every connection pool bound to the previous one), runs each app's lifespan
startup once in it, and hands each replay a fresh ``contextvars`` context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import importlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import worker_process_shutdown

from ._celery import TASK_NAME, Binding, ConfigurationError, hard_time_limit
from ._middleware import REPLAY_KEY, ASGIApp, Message
from ._progress import reporting_to
from ._wire import encode_response, request_scope

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024
DEFAULT_TIME_LIMIT = 1800.0


class ResponseTooLarge(Exception):
    """The endpoint's response is larger than ``max_response_size``."""


class AttemptsExhausted(Exception):
    """The replay's worker died on every delivery, ``max_attempts`` times."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"the worker died on each of {attempts} attempts")


class LifespanFailed(Exception):
    """The app answered ``lifespan.startup.failed``."""


class NoResponse(Exception):
    """The app returned without starting a response."""


def register_replay(
    celery_app: Celery,
    apps: Mapping[str, ASGIApp | str],
    *,
    max_attempts: int = 3,
    time_limit: float | None = None,
    max_response_size: int = 10 * _MiB,
    lifespan_timeout: float = 30.0,
    cancel_check_interval: float = 0.5,
) -> Task:
    """Register the replay task on ``celery_app``; one worker serves every app in ``apps``.

    ``apps`` maps the ``name=`` each app's middleware was given to the app itself or to its
    import string (``"myproject.main:app"``, imported in the worker process on first use, which
    also avoids an import cycle between the app and the module that makes the Celery app).

    The task is late-acknowledged and re-queued when its worker process dies, so a request
    may run more than once: endpoints on marked routes should be idempotent. A request whose
    worker dies ``max_attempts`` times (one that kills it, say) then fails with a 500 instead
    of looping. ``time_limit`` (default: Celery's ``task_time_limit``, else 30 minutes) stops a
    replay and fails it; with a Redis broker it must stay below the ``visibility_timeout``, or
    Redis would hand a running task to a second worker: such a configuration refuses to start.
    """
    if not apps:
        raise ConfigurationError("register_replay(apps=...) is empty: name at least one app")
    if TASK_NAME in celery_app.tasks:
        raise ConfigurationError("register_replay was already called for this Celery app")
    if max_attempts < 1:
        raise ConfigurationError(f"max_attempts={max_attempts!r}: it must be at least 1")
    binding = Binding.of(celery_app)
    soft_limit = float(time_limit or celery_app.conf.task_time_limit or DEFAULT_TIME_LIMIT)
    # The soft limit cancels the replay in-process; the hard one, a little later, kills a
    # process whose endpoint ignores cancellation (a blocking call in a thread).
    hard_limit = hard_time_limit(celery_app, soft_limit)
    registry = _Apps(apps)

    def replay(task: Task, envelope: dict[str, Any]) -> dict[str, Any]:
        task_id: str = task.request.id
        store = task.backend.client  # the result backend's own (synchronous) Redis client
        record_key = binding.record_key(task_id)

        def cancelled() -> bool:
            return not store.exists(record_key)

        def drop() -> None:
            # Deleted, expired, or never fully submitted: nothing runs, nothing is stored.
            store.delete(binding.meta_key(task_id), binding.attempts_key(task_id))
            logger.info("task %s dropped: its submission record is gone", task_id)
            raise Ignore()

        attempts = binding.begin_attempt(store, task_id)
        if attempts is None:
            drop()
        elif attempts > max_attempts:
            # Each earlier delivery died with its worker: stop redelivering, report a failure.
            logger.warning("task %s failed: its worker died %d times", task_id, attempts - 1)
            task.backend.mark_as_failure(task_id, AttemptsExhausted(attempts - 1))
            raise Ignore()
        app = registry.get(envelope.get("app", ""))

        def progress(data: dict[str, Any]) -> None:
            task.update_state(task_id=task_id, state="STARTED", meta={"progress": data})

        future = _loop().run(_replay(app, envelope, max_response_size, lifespan_timeout), progress)
        try:
            while True:
                try:
                    response = future.result(timeout=cancel_check_interval)
                    break
                except concurrent.futures.TimeoutError:
                    if cancelled():
                        future.cancel()
                        drop()
        except BaseException:
            future.cancel()  # a time limit or a worker shutdown: stop the replay too
            raise
        # A DELETE racing the end of the replay needs no check here: the status URL answers
        # only while the record exists, so a result stored after it is never served (and
        # expires); one round trip less per task.
        return response

    task: Task = celery_app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        track_started=True,
        soft_time_limit=soft_limit,
        time_limit=hard_limit,
        serializer="json",
        shared=False,  # registered on this Celery app only, not on every app in the process
        # Celery logs a task's return value at INFO: cut it before the headers and the body.
        resultrepr_maxsize=24,
    )(replay)
    return task


async def _replay(
    app: ASGIApp, envelope: dict[str, Any], limit: int, lifespan_timeout: float
) -> dict[str, Any]:
    """Call the app as a server would, the way httpx's ASGITransport does: the body, then
    ``http.disconnect`` only after the response is complete."""
    state = await _loop().start_lifespan(app, lifespan_timeout)
    scope, body = request_scope(envelope)
    scope["state"] = dict(state)
    scope[REPLAY_KEY] = True
    request_sent = False
    response_done = asyncio.Event()
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    size = 0

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.extend((bytes(k), bytes(v)) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ResponseTooLarge(f"the response is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                response_done.set()

    try:
        # Background tasks run inside this call, after the last body chunk: they are done
        # before the result is stored.
        await app(scope, receive, send)
    finally:
        response_done.set()
    if status is None:
        raise NoResponse("the app returned without sending a response")
    return encode_response(status, headers, b"".join(chunks))


class _Apps:
    """The apps one worker serves, by name, imported on first use."""

    def __init__(self, apps: Mapping[str, ASGIApp | str]) -> None:
        self._specs = dict(apps)
        self._resolved: dict[str, ASGIApp] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ASGIApp:
        with self._lock:
            app = self._resolved.get(name)
            if app is None:
                spec = self._specs.get(name)
                if spec is None:
                    raise LookupError(f"no app named {name!r} is registered in this worker")
                app = _import(spec) if isinstance(spec, str) else spec
                self._resolved[name] = app
            return app


def _import(spec: str) -> ASGIApp:
    module, sep, attribute = spec.partition(":")
    if not sep:
        raise ConfigurationError(f"app {spec!r} is not of the form 'package.module:attribute'")
    app: ASGIApp = getattr(importlib.import_module(module), attribute)
    return app


class _Loop:
    """One event loop per worker process, in a daemon thread, for the process's whole life."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="async-task-middleware-loop", daemon=True
        )
        self._thread.start()
        self._lifespans: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        self._starting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    def run(self, coro: Any, progress: Any) -> concurrent.futures.Future[dict[str, Any]]:
        async def isolated() -> dict[str, Any]:
            # A fresh context per replay: nothing a previous request set leaks into this one.
            context = contextvars.Context()
            context.run(reporting_to, progress)
            return await asyncio.get_running_loop().create_task(coro, context=context)

        return asyncio.run_coroutine_threadsafe(isolated(), self._loop)

    async def start_lifespan(self, app: ASGIApp, timeout: float) -> dict[str, Any]:
        """The state the app's lifespan startup left, run once per app in this loop."""
        starting = self._starting.get(id(app))
        if starting is None:
            starting = asyncio.get_running_loop().create_future()
            self._starting[id(app)] = starting
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(
                self._lifespan(app, timeout, starting, stop), context=contextvars.Context()
            )
            self._lifespans.append((stop, task))
        return await asyncio.shield(starting)

    async def _lifespan(
        self,
        app: ASGIApp,
        timeout: float,
        started: asyncio.Future[dict[str, Any]],
        stop: asyncio.Event,
    ) -> None:
        """Drive the ASGI lifespan protocol: startup now, shutdown when the process stops."""
        state: dict[str, Any] = {}
        to_app: asyncio.Queue[Message] = asyncio.Queue()
        from_app: asyncio.Queue[Message] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        scope["state"] = state

        async def run_app() -> None:
            await app(scope, to_app.get, from_app.put)

        running = asyncio.get_running_loop().create_task(run_app())

        async def answer(request: str) -> Message | None:
            await to_app.put({"type": f"lifespan.{request}"})
            reply = asyncio.get_running_loop().create_task(from_app.get())
            await asyncio.wait({reply, running}, timeout=timeout, return_when="FIRST_COMPLETED")
            if reply.done():
                return reply.result()
            reply.cancel()
            if running.done():
                return None  # returned or raised: the app does not speak lifespan
            raise TimeoutError(f"the app did not answer lifespan.{request} in {timeout} s")

        try:
            reply = await answer("startup")
        except BaseException as exc:
            started.set_exception(exc)
            running.cancel()
            return
        if reply is None:
            started.set_result({})
            return
        if reply["type"] != "lifespan.startup.complete":
            started.set_exception(LifespanFailed(reply.get("message", "")))
            return
        started.set_result(state)
        await stop.wait()
        try:
            await answer("shutdown")
        except TimeoutError:
            logger.warning("lifespan shutdown timed out")
            running.cancel()

    def shutdown(self, timeout: float = 10.0) -> None:
        async def stop_all() -> None:
            for stop, _ in self._lifespans:
                stop.set()
            tasks = [task for _, task in self._lifespans]
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(timeout + 1)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


_current: _Loop | None = None
_current_lock = threading.Lock()


def _loop() -> _Loop:
    """This process's loop, made on first use, so a forked pool child makes its own."""
    global _current
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = _Loop()
        return _current


def _shutdown_lifespans(**_: Any) -> None:
    loop = _current
    if loop is not None and loop.pid == os.getpid():
        loop.shutdown()


worker_process_shutdown.connect(_shutdown_lifespans, weak=False)
