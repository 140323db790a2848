"""How the task store's calls to Redis run: under a deadline, again while the connection
fails, and, for crowds of waiters, coalesced into one pipeline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from redis.exceptions import ConnectionError as LostConnection
from redis.exceptions import RedisError

from .state import StoreUnavailable, TaskState

T = TypeVar("T")


async def again(call: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
    """Make an idempotent call, again while the connection fails: a Redis restarting, or a
    Sentinel failover under way (no master known yet, or the old one now a replica). The
    caller's deadline ends the tries: its own timeout around this, or ``deadline`` (the
    loop's clock), past which the lost connection is a ``TimeoutError``."""
    delay = 0.02
    while True:
        try:
            return await call()
        except LostConnection:
            if deadline is None:
                await asyncio.sleep(delay)
            else:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError("Redis did not answer in time") from None
                await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, 0.5)


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """``StoreUnavailable`` when Redis does not answer within ``seconds``, or fails."""
    # asyncio.timeout, not anyio.fail_after: redis.asyncio runs on asyncio only, and this
    # is on every request's path, where a cancel scope costs several times more.
    try:
        async with asyncio.timeout(seconds):
            yield
    except (TimeoutError, RedisError, OSError) as exc:
        raise StoreUnavailable("Redis did not answer in time") from exc


class ReadBatch:
    """Reads asked for in one turn of the loop, made together: one ``read_many`` at a time
    carries every read asked for meanwhile, and reads of the same task share one."""

    def __init__(self, read_many: Callable[[list[str]], Awaitable[list[TaskState]]]) -> None:
        self._read_many = read_many
        self._batch: dict[str, asyncio.Future[TaskState]] = {}
        self._flushing = False

    async def read(self, task_id: str) -> TaskState:
        future = self._batch.get(task_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._batch[task_id] = future
            if not self._flushing:
                self._flushing = True
                asyncio.get_running_loop().create_task(self._flush_all())
        return await asyncio.shield(future)

    async def _flush_all(self) -> None:
        try:
            await asyncio.sleep(0)  # gather the reads asked for in this turn of the loop
            while self._batch:
                batch, self._batch = self._batch, {}
                await self._flush(batch)
        finally:
            self._flushing = False

    async def _flush(self, batch: dict[str, asyncio.Future[TaskState]]) -> None:
        try:
            states = await self._read_many(list(batch))
        except BaseException as exc:
            # Every waiter gets an answer, even when the flush itself is cancelled.
            for future in batch.values():
                if not future.done():
                    future.set_exception(StoreUnavailable(str(exc)))
            if not isinstance(exc, Exception):
                raise  # a cancellation goes on up
            return
        for future, state in zip(batch.values(), states, strict=True):
            if not future.done():
                future.set_result(state)


class Shared:
    """Identical calls in flight at once, made once: a hundred live readers woken by the same
    note ask for the same bytes, and one ``GETRANGE`` answers them all (one connection, not a
    hundred)."""

    def __init__(self) -> None:
        self._flying: dict[object, asyncio.Task[Any]] = {}

    async def call(self, key: object, make: Callable[[], Awaitable[T]]) -> T:
        future = self._flying.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_task(self._make(key, make))
            self._flying[key] = future
        # shield: one caller going away does not cancel the call the others wait on.
        return cast(T, await asyncio.shield(future))

    async def _make(self, key: object, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        finally:
            del self._flying[key]
