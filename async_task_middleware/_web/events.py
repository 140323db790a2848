"""One Redis subscription per event loop, shared by every waiting request and event stream.

The worker publishes a short note on ``<p>events-<id>`` whenever a task's state changes (it
began, it reported progress, it ended); a waiter subscribes to the channel of the task it waits
on, and reads the task's state (one ``MGET``) when a note arrives. One pub/sub connection serves
every channel of the process, a channel is unsubscribed when its last listener leaves, and no
waiter ever polls Redis in a loop: 1,000 long polls hold one connection, not 1,000.

A waiter reads the state only after Redis confirmed its subscription, so no note published in
between is missed. When the subscription is lost (Redis restarted), each listener gets ``None``
and falls back to one read at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

#: A note, or None when the subscription was lost.
Note = bytes | None


class Subscriptions:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._listeners: dict[bytes, set[asyncio.Queue[Note]]] = {}
        self._confirmed: dict[bytes, asyncio.Event] = {}
        self._chores: set[asyncio.Task[None]] = set()  # unsubscribes and closes in flight

    @property
    def channels(self) -> int:
        return len(self._listeners)

    @contextlib.asynccontextmanager
    async def listen(self, channel: bytes, timeout: float) -> AsyncIterator[asyncio.Queue[Note]]:
        """Notes published on ``channel`` from the moment Redis confirmed the subscription
        (waited for at most ``timeout``), until the block ends."""
        queue: asyncio.Queue[Note] = asyncio.Queue()
        listeners = self._listeners.setdefault(channel, set())
        listeners.add(queue)
        try:
            confirmed = self._confirmed.get(channel)
            if confirmed is None:
                confirmed = self._confirmed[channel] = asyncio.Event()
                await self._subscribe(channel)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await confirmed.wait()
            if not confirmed.is_set():
                queue.put_nowait(None)  # not confirmed in time: read at the deadline instead
            yield queue
        finally:
            listeners.discard(queue)
            if not listeners and self._listeners.get(channel) is listeners:
                del self._listeners[channel]
                self._confirmed.pop(channel, None)
                # Not awaited here: a waiter that is being cancelled must not be held up.
                self._chore(self._unsubscribe(channel))

    async def _subscribe(self, channel: bytes) -> None:
        try:
            async with self._lock:
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub()
                await self._pubsub.subscribe(channel)
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.get_running_loop().create_task(self._read())
        except (RedisError, OSError) as exc:
            logger.warning("subscription unavailable: %s", type(exc).__name__)
            self._lost()

    def _chore(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _unsubscribe(self, channel: bytes) -> None:
        if channel in self._listeners:
            return  # a new listener came meanwhile
        try:
            async with self._lock:
                if self._pubsub is not None:
                    await self._pubsub.unsubscribe(channel)
        except Exception as exc:  # redis-py raises more than RedisError on a closing connection
            logger.debug("unsubscribe failed: %r", exc)
            self._lost()

    async def _read(self) -> None:
        pubsub = self._pubsub
        try:
            while self._listeners or pubsub.subscribed:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                channel = message.get("channel")
                if message["type"] == "subscribe":
                    event = self._confirmed.get(channel)
                    if event is not None:
                        event.set()
                elif message["type"] == "message":
                    for queue in self._listeners.get(channel, ()):
                        queue.put_nowait(message["data"])
        except (RedisError, OSError) as exc:
            logger.warning("subscription lost: %s", type(exc).__name__)
            self._lost()

    def _lost(self) -> None:
        """Every listener falls back to its deadline; the next one subscribes anew."""
        for queues in self._listeners.values():
            for queue in queues:
                queue.put_nowait(None)
        self._listeners.clear()
        self._confirmed.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            self._chore(_close(pubsub))

    async def aclose(self) -> None:
        for chore in list(self._chores):
            chore.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._reader
        if self._pubsub is not None:
            await _close(self._pubsub)
            self._pubsub = None


async def _close(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()
