"""The task store on the web side: submission records and task state, in Redis, never blocking.

Two keys per task, both expiring after the result lifetime:

- ``async-task-middleware-<id>``, the submission record: it exists from the 303 until DELETE or
  expiry. It alone tells a known task from an unknown one (Celery says ``PENDING`` for any id),
  and the worker runs a task only while its record exists, so a DELETE or an expiry also stops
  a queued task, even one that was cancelled while no worker was up.
- ``celery-task-meta-<id>``, written by Celery in the worker: state, progress, the response.

Every call runs under a deadline; on expiry or a connection error it raises ``StoreUnavailable``,
which the middleware answers with 503.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from ._celery import Binding


class StoreUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


@dataclass(frozen=True, slots=True)
class TaskState:
    exists: bool
    meta: dict[str, Any] | None


class TaskStore:
    def __init__(self, binding: Binding, *, timeout: float, max_connections: int) -> None:
        self._binding = binding
        self._timeout = timeout
        pool = BlockingConnectionPool.from_url(
            binding.redis_url,
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free connection counts against the deadline too
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._redis = Redis(connection_pool=pool)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def record(self, envelope: dict[str, Any]) -> bytes:
        # Room for what later features need (owner, fingerprint for idempotency keys).
        return json.dumps(
            {
                "v": 1,
                "created": time.time(),
                "app": envelope["app"],
                "method": envelope["method"],
                "path": envelope["path"],
            }
        ).encode()

    async def submit(self, task_id: str, record: bytes, message: bytes | None = None) -> None:
        """Write the submission record and, for the native Redis broker, push the task message
        in the same MULTI/EXEC: both happen or neither does."""
        b = self._binding
        with self._deadline():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(b.record_key(task_id), record, ex=b.expires)
                if message is not None:
                    assert b.fast_queue is not None
                    pipe.lpush(b.fast_queue, message)
                await pipe.execute()

    async def read(self, task_id: str) -> TaskState:
        b = self._binding
        with self._deadline():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(b.record_key(task_id))
                pipe.get(b.meta_key(task_id))
                exists, raw = await pipe.execute()
        if not exists:
            return TaskState(False, None)
        meta = b.celery_app.backend.decode(raw) if raw is not None else None
        return TaskState(True, meta)

    async def delete(self, task_id: str) -> bool:
        """Forget the task; True when it was known. The worker sees the record gone and drops
        or stops the task."""
        b = self._binding
        with self._deadline():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(b.record_key(task_id))
                pipe.delete(b.meta_key(task_id), b.attempts_key(task_id))
                removed, _ = await pipe.execute()
        return bool(removed)

    async def forget(self, task_id: str) -> None:
        """Best-effort undo of a submission whose publish failed."""
        try:
            with anyio.fail_after(self._timeout):
                await self._redis.delete(self._binding.record_key(task_id))
        except (TimeoutError, RedisError, OSError):
            pass  # the record expires; the worker drops a task whose record is gone

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[None]:
        try:
            with anyio.fail_after(self._timeout):
                yield
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable("Redis did not answer in time") from exc
