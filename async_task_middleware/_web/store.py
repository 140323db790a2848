"""The task store on the web side: submissions, reads and deletes in Redis, never blocking.

The keys and the scripts are described in ``_shared.scripts``. Every call runs under a deadline; on
expiry or a connection error it raises ``StoreUnavailable``, which the middleware answers with
503, after settling whatever the call may have left behind (``retract``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from .._shared import scripts as _scripts
from .._shared.binding import Binding
from .._shared.deployment import backend_pool, is_cluster
from .calls import ReadBatch, Shared, again, deadline
from .collection import read_page
from .events import Subscriptions
from .lane import Lane, pack
from .settle import Settles
from .state import Listed, Outcome, Page, StoreUnavailable, Submission, TaskState

CLIENT_NAME = "async-task-middleware-web"
T = TypeVar("T")


# How long before the web side gives up waiting the script's own deadline falls: a script that
# ran just before it still has this long to answer.
_REPLY_MARGIN = 0.25
# A submission whose message is larger than this goes through the pool, not the lane, where it
# would hold up the status reads queued behind it for as long as it takes to write.
_LANE_LIMIT = 256 * 1024
# A large body is read and sent in pieces of this size.
_BODY_PIECE = 256 * 1024
# At most this many pieces of large bodies are read at once, per event loop.
_BULK_READS = 8
# How often the offset between this host's clock and Redis's is measured again.
_CLOCK_SYNC_INTERVAL = 60.0


class TaskStore:
    def __init__(self, binding: Binding, *, timeout: float, max_connections: int) -> None:
        self._binding = binding
        self._timeout = timeout
        self._clock_offset = 0.0
        self._clock_synced = -_CLOCK_SYNC_INTERVAL
        # Waiting for a free connection counts against the deadline too.
        pool = backend_pool(
            binding.celery_app,
            max_connections=max_connections,
            timeout=timeout,
            client_name=CLIENT_NAME,
        )
        self._redis = Redis(connection_pool=pool)
        self._lane = Lane(pool)
        self.events = Subscriptions(self._redis)
        self._batched = ReadBatch(self._read_many)
        self._shared = Shared()
        self._bulk = asyncio.Semaphore(_BULK_READS)
        self._settles = Settles(self.retract)
        self._submit = self._redis.register_script(_scripts.SUBMIT)
        self._retract = self._redis.register_script(_scripts.RETRACT)
        self._delete = self._redis.register_script(_scripts.DELETE)
        self._list = self._redis.register_script(_scripts.LIST)

    async def aclose(self) -> None:
        # A settle still under way decides whether a task answered 503 may run: two more
        # tries, at most, for a shutdown is awaited.
        await self._settles.aclose(max(2 * self._timeout, 1.0))
        await self.events.aclose()
        await self._lane.aclose()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    async def submit(
        self,
        sub: Submission,
        message: bytearray | None,
        *,
        timeout: float,
        replicas: int | None = None,
    ) -> tuple[Outcome, str]:
        """Write the submission record and, for the native Redis broker, push the task message
        in the same script, within the caps: all of it happens or none of it does, and none of
        it once ``timeout`` has passed (see ``SUBMIT``)."""
        b = self._binding
        start = time.time()
        record = {
            "v": 1,
            "created": time.time(),
            "app": sub.app,
            "route": sub.route,
            "owner": sub.owner,
        }
        if sub.webhook is not None:
            record["webhook"] = sub.webhook
        if sub.path:
            record["path"] = sub.path
        if sub.idempotency_key is not None:
            record["idempotency"] = sub.idempotency_key.decode()
        record_key = b.record_key(sub.task_id)
        keys = [
            record_key,
            (sub.queue or b.fast_queue or "").encode() or record_key,
            b.tombstone_key(sub.task_id),
            b.owner_set_key(sub.owner),
            b.queued_set_key(sub.app, sub.route),
            sub.idempotency_key or record_key,
            b.message_key(sub.task_id),
            self._collection(sub) or record_key,
        ]
        owner_cap = sub.owner_cap if sub.owner is not None else None
        args: list[bytes | bytearray | memoryview | str | int] = [
            json.dumps(record),
            b.expires,
            # A view, not the bytearray: redis-py's hiredis packer copies a bytearray twice
            # (into bytes, then into one command); a view takes its own packer, which writes
            # the buffer as it is.
            memoryview(message) if message is not None else b"",
            sub.task_id,
            repr(time.time()),
            "" if owner_cap is None else owner_cap,
            "" if sub.queued_cap is None else sub.queued_cap,
            "",  # the deadline on Redis's clock, once the clock's offset is known
            sub.fingerprint,
            "1" if self._collection(sub) else "",
        ]
        # One deadline for all of it, the clock's measurement included.
        deadline = asyncio.get_running_loop().time() + timeout
        if self._clock_stale():
            async with self._deadline(timeout):
                await self._sync_clock()
        args[7] = repr(start + self._clock_offset + timeout * (1 - _REPLY_MARGIN))
        if replicas is None and (message is None or len(message) <= _LANE_LIMIT):
            # The lane keeps the deadline itself: no timer of this call's own.
            try:
                answer = await again(
                    lambda: self._evalsha(self._submit, keys, args, deadline), deadline
                )
            except (TimeoutError, RedisError, OSError) as exc:
                raise StoreUnavailable("Redis did not answer in time") from exc
        else:
            left = max(deadline - asyncio.get_running_loop().time(), 0.001)
            async with self._deadline(left):
                if replicas is None:
                    answer = await again(lambda: self._submit(keys=keys, args=args))
                else:
                    answer = await again(lambda: self._replicated(keys, args, replicas, left))
        outcome = Outcome(answer[0])
        return outcome, answer[1].decode() if outcome is Outcome.DUPLICATE else sub.task_id

    async def _evalsha(
        self, script: AsyncScript, keys: list[Any], args: list[Any], deadline: float
    ) -> Any:
        """Run ``script`` on the lane by ``deadline`` (the loop's clock); loaded again when
        Redis does not know it (restarted, or a replica promoted)."""
        command = pack(b"EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._lane.call(command, deadline)
        except NoScriptError:
            load = pack(b"SCRIPT", b"LOAD", cast(str | bytes, script.script))
            await self._lane.call(load, deadline)
            return await self._lane.call(command, deadline)

    async def _replicated(
        self, keys: list[Any], args: list[Any], replicas: int, timeout: float
    ) -> Any:
        """The submit script, then ``WAIT`` on the same connection: accepted only once
        ``replicas`` replicas have it. Fewer in time is an unknown outcome (the caller retracts
        the task and answers 503), never a 303 a master's death could take back."""
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._submit(keys=keys, args=args, client=pipe)
            pipe.wait(replicas, max(1, int(timeout * (1 - _REPLY_MARGIN) * 1000)))
            answer, acknowledged = await pipe.execute()
        if answer[0] == Outcome.ACCEPTED and acknowledged < replicas:
            raise StoreUnavailable(f"{acknowledged} of {replicas} replicas have the task")
        return answer

    async def is_cluster(self) -> bool:
        """Whether the Redis is a cluster node; an unreachable Redis is not refused (it may
        come up later: requests meanwhile are 503)."""
        try:
            async with self._deadline():
                return is_cluster(await self._redis.info("cluster"))
        except StoreUnavailable:
            return False

    def _clock_stale(self) -> bool:
        return time.monotonic() - self._clock_synced >= _CLOCK_SYNC_INTERVAL

    async def _sync_clock(self) -> None:
        """Learn how far Redis's clock is from this host's (to the round trip's precision),
        so that the submit script's deadline is on Redis's clock."""
        if not self._clock_stale():
            return
        before = time.time()
        async with self._deadline():
            seconds, microseconds = await self._redis.time()
        after = time.time()
        self._clock_offset = seconds + microseconds / 1e6 - (before + after) / 2
        self._clock_synced = time.monotonic()

    async def retract(self, sub: Submission) -> bool:
        """Settle a submission whose outcome is unknown: True when a worker already began it
        (it was accepted after all); else it is taken back for good and False. Safe to run
        again: a second run finds it taken back, or begun."""
        b = self._binding
        record_key = b.record_key(sub.task_id)
        keys = [
            record_key,
            b.attempts_key(sub.task_id),
            b.tombstone_key(sub.task_id),
            b.owner_set_key(sub.owner),
            b.queued_set_key(sub.app, sub.route),
            sub.idempotency_key or record_key,
            b.message_key(sub.task_id),
            self._collection(sub) or record_key,
        ]
        args: list[str | int] = [sub.task_id, b.expires, "1" if sub.idempotency_key else ""]
        async with self._deadline():
            return bool(await again(lambda: self._retract(keys=keys, args=args)))

    def _collection(self, sub: Submission) -> bytes | None:
        """The owner's collection the submission goes into, None when it goes into none."""
        return self._binding.collection_key(sub.owner) if sub.listed and sub.owner else None

    async def list_tasks(
        self, owner: str, page: Page
    ) -> tuple[list[Listed], tuple[str, str] | None]:
        """One page of ``owner``'s tasks, newest first, in one call (``_web.collection``)."""
        async with self._deadline():
            return await again(lambda: read_page(self._list, self._binding, owner, page))

    async def settle(self, sub: Submission, seconds: float) -> bool:
        """``retract`` within ``seconds``: True when a worker already began ``sub``. One that
        needs longer goes on in the background while the 503 goes out (``_web.settle``)."""
        return await self._settles.settle(sub, seconds)

    def decode_meta(self, raw: bytes) -> dict[str, Any]:
        # Plain JSON is the common case and json.loads a third of the cost of the backend's
        # decode, which also handles compressed results and checks the content type.
        if raw[:1] == b"{":
            meta: dict[str, Any] = json.loads(raw)
        else:
            meta = self._binding.celery_app.backend.decode(raw)
        return meta

    def _keys(self, task_id: str) -> list[bytes]:
        b = self._binding
        return [
            b.record_key(task_id),
            b.result_key(task_id),
            b.meta_key(task_id),
            b.heartbeat_key(task_id),
            b.attempts_key(task_id),
            b.webhook_key(task_id),
            b.retry_key(task_id),
            b.head_key(task_id),
        ]

    def _state(self, values: list[Any]) -> TaskState:
        record, outcome, meta, live, began, hook, retry, head = values
        if record is None:
            return TaskState(None)
        return TaskState(
            json.loads(record),
            cast(bytes | None, outcome),
            cast(bytes | None, meta),
            live is not None,
            began is not None,
            self.decode_meta,
            cast(bytes | None, hook),
            cast(bytes | None, retry),
            cast(bytes | None, head),
        )

    async def read(self, task_id: str) -> TaskState:
        """Everything a status answer needs, in one command and one round trip, on the
        loop's shared pipelined connection (``_web.lane``). Every status request comes here: its
        deadline is the lane's, with no timer of its own."""
        command = pack(b"MGET", *self._keys(task_id))
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            values = await again(lambda: self._lane.call(command, deadline), deadline)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable("Redis did not answer in time") from exc
        return self._state(values)

    async def read_batched(self, task_id: str) -> TaskState:
        """The same, for waiters: one pipeline at a time carries every read asked for
        meanwhile, on one connection, and reads of the same task share one ``MGET``. A
        thousand waiters woken at once then cost a round trip or two, not a thousand
        connections."""
        return await self._batched.read(task_id)

    async def body(self, task_id: str, length: int, first: int = 0) -> AsyncGenerator[bytes, None]:
        """A body kept apart (``_shared.wire.INLINE_BODY``), from byte ``first`` to ``length``,
        in pieces as they are read: through the pool, not the lane, where it would hold up the
        reads behind it. StoreUnavailable if it is gone meanwhile (deleted, expired) or Redis
        fails."""
        key = self._binding.body_key(task_id)
        for start in range(first, length, _BODY_PIECE):
            end = min(start + _BODY_PIECE, length)
            piece = await self._getrange(key, start, end)
            if len(piece) != end - start:
                raise StoreUnavailable("the result's body is gone")
            yield piece

    async def streamed(self, task_id: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of a response being streamed (at most a piece's worth),
        through the pool; fewer once it ended (its outcome holds them then)."""
        end = min(end, start + _BODY_PIECE)
        return await self._getrange(self._binding.stream_key(task_id), start, end)

    async def _getrange(self, key: bytes, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of ``key``. Readers asking for the same bytes at once
        share one ``GETRANGE``, and at most ``_BULK_READS`` are under way: a crowd reading large
        bodies holds that many connections, not one each (Redis serves them one at a time
        anyway). Waiting for a turn counts against the deadline."""

        async def getrange() -> bytes:
            async with self._deadline(), self._bulk:
                return cast(bytes, await self._redis.getrange(key, start, end - 1))

        return await self._shared.call((key, start, end), getrange)

    async def delete(
        self, task_id: str, owners: Sequence[str]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the task if ``owners`` may (any of the requester's owner hashes; none for an
        anonymous requester): whether it was deleted, and the webhook of a task deleted before
        it ended. The worker sees the record gone and drops or stops the task."""
        b = self._binding
        keys = [
            b.record_key(task_id),
            b.meta_key(task_id),
            b.attempts_key(task_id),
            b.result_key(task_id),
            b.heartbeat_key(task_id),
            b.message_key(task_id),
            b.body_key(task_id),
            b.webhook_key(task_id),
            b.retry_key(task_id),
            b.head_key(task_id),
            b.stream_key(task_id),
        ]
        async with self._deadline():
            args: list[bytes | str] = [b.record_prefix, task_id, *owners]
            deleted, hook = await again(lambda: self._delete(keys=keys, args=args))
        return bool(deleted), json.loads(hook) if hook else None

    def _deadline(self, seconds: float | None = None) -> AbstractAsyncContextManager[None]:
        return deadline(seconds or self._timeout)

    async def _read_many(self, task_ids: list[str]) -> list[TaskState]:
        async with self._deadline(), self._redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.mget(self._keys(task_id))
            results = await pipe.execute()
        return [self._state(values) for values in results]
