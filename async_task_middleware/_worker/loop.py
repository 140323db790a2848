"""One event loop per worker process, in a thread of its own, and the apps' lifespans in it.

A loop per task would strand every connection pool bound to the previous one; so each worker
process keeps one loop for its whole life, runs each app's lifespan startup once in it, and
hands each replay a fresh ``contextvars`` context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from typing import Any

from celery.signals import worker_process_shutdown

from .._shared.types import ASGIApp, Message
from .apps import worker_logging_kept
from .progress import reporting_to

logger = logging.getLogger(__name__)


class LifespanFailed(Exception):
    """The app's lifespan startup failed (``lifespan.startup.failed``, or no answer in time)."""


class ReplayTimeLimit(Exception):
    """The replay ran past its time limit and was cancelled (or could not be)."""


class Loop:
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

    def run(self, coro: Any, progress: Any, limit: float) -> concurrent.futures.Future[Any]:
        """Run a replay in this loop, cancelled after ``limit`` seconds: the time limit holds
        on every pool, threads included, where Celery's signal-based limits do not act."""

        async def isolated() -> Any:
            # A fresh context per replay: nothing a previous request set leaks into this one.
            context = contextvars.Context()
            context.run(reporting_to, progress)
            task = asyncio.get_running_loop().create_task(coro, context=context)
            try:
                async with asyncio.timeout(limit):
                    return await task
            except TimeoutError:
                raise ReplayTimeLimit(
                    f"the replay ran past its time limit of {limit:g} s"
                ) from None

        return asyncio.run_coroutine_threadsafe(isolated(), self._loop)

    async def start_lifespan(self, app: ASGIApp, timeout: float) -> dict[str, Any]:
        """The state the app's lifespan startup left, run once per app in this loop."""
        starting = self._starting.get(id(app))
        if starting is not None and starting.done():
            if starting.exception() is None:
                return starting.result()  # started: the usual case, with nothing to undo
            starting = None  # a failed startup is tried again by the next replay
        if starting is None:
            starting = asyncio.get_running_loop().create_future()
            self._starting[id(app)] = starting
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(
                self._lifespan(app, timeout, starting, stop), context=contextvars.Context()
            )
            self._lifespans.append((stop, task))
        with worker_logging_kept():  # what the startup did to logging, undone once it is up
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
        except TimeoutError as exc:
            started.set_exception(LifespanFailed(str(exc)))
            running.cancel()
            return
        except BaseException as exc:
            started.set_exception(exc)
            running.cancel()
            return
        if reply is None:
            # The app returned or raised instead of answering (Django's ASGI handler raises
            # for lifespan scopes): it has no lifespan, which is fine, as uvicorn says too.
            error = None if running.cancelled() else running.exception()
            logger.info("the app does not support lifespan (%s): running without it", error)
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


_current: Loop | None = None
_current_lock = threading.Lock()


def process_loop() -> Loop:
    """This process's loop, made on first use, so a forked pool child makes its own."""
    global _current
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = Loop()
        return _current


def replace_process_loop(blocked: Loop) -> None:
    """Leave the ``blocked`` loop to the work that blocks it; the next replay gets a new one
    (and runs the apps' lifespan startup in it again). Other replays failed with it find it
    replaced already."""
    global _current
    with _current_lock:
        if _current is blocked:
            _current = None


def _shutdown_lifespans(**_: Any) -> None:
    loop = _current
    if loop is not None and loop.pid == os.getpid():
        loop.shutdown()


worker_process_shutdown.connect(_shutdown_lifespans, weak=False)
