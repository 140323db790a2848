"""The task store on the web side: submissions, reads and deletes in Redis, never blocking.

The keys and the scripts are described in ``_scripts``. Every call runs under a deadline; on
expiry or a connection error it raises ``StoreUnavailable``, which the middleware answers with
503, after settling whatever the call may have left behind (``retract``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from . import _scripts
from ._celery import Binding


class StoreUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


class Outcome(enum.IntEnum):
    """What the submit script decided."""

    ACCEPTED = 1
    REFUSED = 0  # a tombstone: this id was already answered 503
    OWNER_FULL = -1
    QUEUE_FULL = -2


@dataclass(frozen=True, slots=True)
class Submission:
    """One submission's facts for the script: who, which route, and the caps that apply."""

    task_id: str
    app: str
    route: str
    owner: str | None
    owner_cap: int | None
    queued_cap: int | None


@dataclass(frozen=True, slots=True)
class TaskState:
    """A status read: the record (None: unknown), the outcome (a packed response or
    ``_scripts.FAILED``), Celery's meta (progress, failure details), and whether a worker runs
    the task now (``live``) or ran it before (``began``: no heartbeat now means it waits to be
    delivered again)."""

    record: dict[str, Any] | None
    outcome: bytes | None = None
    meta: dict[str, Any] | None = None
    live: bool = False
    began: bool = False


def _decode_meta(binding: Binding, raw: bytes) -> dict[str, Any]:
    # Plain JSON is the common case and json.loads a third of the cost of the backend's
    # decode, which also handles compressed results and checks the content type.
    if raw[:1] == b"{":
        meta: dict[str, Any] = json.loads(raw)
    else:
        meta = binding.celery_app.backend.decode(raw)
    return meta


# How long before the web side gives up waiting the script's own deadline falls: a script that
# ran just before it still has this long to answer.
_REPLY_MARGIN = 0.25
# How often the offset between this host's clock and Redis's is measured again.
_CLOCK_SYNC_INTERVAL = 60.0


class TaskStore:
    def __init__(self, binding: Binding, *, timeout: float, max_connections: int) -> None:
        self._binding = binding
        self._timeout = timeout
        self._clock_offset = 0.0
        self._clock_synced = -_CLOCK_SYNC_INTERVAL
        pool = BlockingConnectionPool.from_url(
            binding.redis_url,
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free connection counts against the deadline too
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._redis = Redis(connection_pool=pool)
        self._submit = self._redis.register_script(_scripts.SUBMIT)
        self._retract = self._redis.register_script(_scripts.RETRACT)
        self._delete = self._redis.register_script(_scripts.DELETE)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    async def submit(
        self, sub: Submission, message: bytearray | None, *, timeout: float
    ) -> Outcome:
        """Write the submission record and, for the native Redis broker, push the task message
        in the same script, within the caps: all of it happens or none of it does, and none of
        it once ``timeout`` has passed (see ``SUBMIT``)."""
        b = self._binding
        await self._sync_clock()
        deadline = time.time() + self._clock_offset + timeout * (1 - _REPLY_MARGIN)
        record = json.dumps(
            {"v": 1, "created": time.time(), "app": sub.app, "route": sub.route, "owner": sub.owner}
        )
        keys = [
            b.record_key(sub.task_id),
            (b.fast_queue or "").encode(),
            b.tombstone_key(sub.task_id),
            b.owner_set_key(sub.owner),
            b.queued_set_key(sub.app, sub.route),
        ]
        owner_cap = sub.owner_cap if sub.owner is not None else None
        args: list[bytes | bytearray | str | int] = [
            record,
            b.expires,
            message if message is not None else b"",
            sub.task_id,
            repr(time.time()),
            "" if owner_cap is None else owner_cap,
            "" if sub.queued_cap is None else sub.queued_cap,
            repr(deadline),
        ]
        async with self._deadline(timeout):
            return Outcome(await self._submit(keys=keys, args=args))

    async def _sync_clock(self) -> None:
        """Learn how far Redis's clock is from this host's (to the round trip's precision),
        so that the submit script's deadline is on Redis's clock."""
        if time.monotonic() - self._clock_synced < _CLOCK_SYNC_INTERVAL:
            return
        before = time.time()
        async with self._deadline():
            seconds, microseconds = await self._redis.time()
        after = time.time()
        self._clock_offset = seconds + microseconds / 1e6 - (before + after) / 2
        self._clock_synced = time.monotonic()

    async def retract(self, sub: Submission) -> bool:
        """Settle a submission whose outcome is unknown: True when a worker already began it
        (it was accepted after all); else it is taken back for good and False."""
        b = self._binding
        keys = [
            b.record_key(sub.task_id),
            b.attempts_key(sub.task_id),
            b.tombstone_key(sub.task_id),
            b.owner_set_key(sub.owner),
            b.queued_set_key(sub.app, sub.route),
        ]
        async with self._deadline():
            return bool(await self._retract(keys=keys, args=[sub.task_id, b.expires]))

    async def read(self, task_id: str) -> TaskState:
        b = self._binding
        # One command, one round trip: everything a status answer needs.
        async with self._deadline():
            record, outcome, meta, live, began = await self._redis.mget(
                b.record_key(task_id),
                b.result_key(task_id),
                b.meta_key(task_id),
                b.heartbeat_key(task_id),
                b.attempts_key(task_id),
            )
        if record is None:
            return TaskState(None)
        return TaskState(
            json.loads(record),
            cast(bytes | None, outcome),
            _decode_meta(b, cast(bytes, meta)) if meta is not None else None,
            live is not None,
            began is not None,
        )

    async def delete(self, task_id: str, owners: list[str]) -> bool:
        """Forget the task if ``owners`` may (any of the requester's owner hashes; none for an
        anonymous requester); True when it was deleted. The worker sees the record gone and
        drops or stops the task."""
        b = self._binding
        keys = [
            b.record_key(task_id),
            b.meta_key(task_id),
            b.attempts_key(task_id),
            b.result_key(task_id),
            b.heartbeat_key(task_id),
        ]
        async with self._deadline():
            return bool(await self._delete(keys=keys, args=[b.record_prefix, task_id, *owners]))

    @contextlib.asynccontextmanager
    async def _deadline(self, seconds: float | None = None) -> AsyncIterator[None]:
        # asyncio.timeout, not anyio.fail_after: redis.asyncio runs on asyncio only, and this
        # is on every request's path, where a cancel scope costs several times more.
        try:
            async with asyncio.timeout(seconds or self._timeout):
                yield
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable("Redis did not answer in time") from exc
