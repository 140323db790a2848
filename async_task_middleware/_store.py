"""The task store on the web side: submission records and task state, in Redis, never blocking.

Three keys per task, all expiring after the result lifetime:

- ``async-task-middleware-<id>``, the submission record: it exists from the 303 until DELETE or
  expiry. It alone tells a known task from an unknown one (Celery says ``PENDING`` for any id),
  and the worker runs a task only while its record exists, so a DELETE or an expiry also stops
  a queued task, even one that was cancelled while no worker was up.
- ``celery-task-meta-<id>``, written by Celery in the worker: state, progress, the response.
- ``async-task-middleware-attempts-<id>``, the worker's count of deliveries (poison requests).

Every call runs under a deadline; on expiry or a connection error it raises ``StoreUnavailable``,
which the middleware answers with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from ._celery import Binding

# A script runs atomically and costs one command where MULTI/SET/LPUSH/EXEC costs four.
_SUBMIT = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[3]) end
return 1
"""


class StoreUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


@dataclass(frozen=True, slots=True)
class TaskState:
    exists: bool
    meta: dict[str, Any] | None


def _decode_meta(binding: Binding, raw: bytes) -> dict[str, Any]:
    # Plain JSON is the common case and json.loads a third of the cost of the backend's
    # decode, which also handles compressed results and checks the content type.
    if raw[:1] == b"{":
        meta: dict[str, Any] = json.loads(raw)
    else:
        meta = binding.celery_app.backend.decode(raw)
    return meta


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
        self._submit_script = self._redis.register_script(_SUBMIT)

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

    async def submit(
        self, task_id: str, record: bytes, message: bytes | None, *, timeout: float
    ) -> None:
        """Write the submission record and, for the native Redis broker, push the task message
        in the same script: both happen or neither does, in one command."""
        b = self._binding
        keys = [b.record_key(task_id), (b.fast_queue or "").encode()]
        async with self._deadline(timeout):
            await self._submit_script(keys=keys, args=[record, b.expires, message or b""])

    async def read(self, task_id: str) -> TaskState:
        b = self._binding
        # One command, one round trip: the record (existence) and Celery's state.
        async with self._deadline():
            record, raw = await self._redis.mget(b.record_key(task_id), b.meta_key(task_id))
        if record is None:
            return TaskState(False, None)
        return TaskState(True, _decode_meta(b, cast(bytes, raw)) if raw is not None else None)

    async def delete(self, task_id: str) -> bool:
        """Forget the task; True when it was known. The worker sees the record gone and drops
        or stops the task."""
        b = self._binding
        async with self._deadline(), self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(b.record_key(task_id))
            pipe.delete(b.meta_key(task_id), b.attempts_key(task_id))
            removed, _ = await pipe.execute()
        return bool(removed)

    async def forget(self, task_id: str) -> None:
        """Best-effort undo of a submission whose publish failed."""
        try:
            async with self._deadline():
                await self._redis.delete(self._binding.record_key(task_id))
        except StoreUnavailable:
            pass  # the record expires; the worker drops a task whose record is gone

    @contextlib.asynccontextmanager
    async def _deadline(self, seconds: float | None = None) -> AsyncIterator[None]:
        # asyncio.timeout, not anyio.fail_after: redis.asyncio runs on asyncio only, and this
        # is on every request's path, where a cancel scope costs several times more.
        try:
            async with asyncio.timeout(seconds or self._timeout):
                yield
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable("Redis did not answer in time") from exc
