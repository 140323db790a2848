"""One pipelined Redis connection per event loop, for the status reads and small submissions.

A status poll is one ``MGET``. Through redis-py's pool it costs more in the client than in
Redis: a checkout and a release under the pool's lock, a task and a timer for the socket
deadline, the command packed argument by argument. The lane instead keeps one connection,
made by the store's own pool (so TLS, Sentinel, ACL user, database and client name are
exactly the store's), writes each command the moment it is asked for, and hands the replies,
which Redis sends in order, to the callers in the order they wrote. Under load the replies of
many requests arrive in one read, without any batching delay.

The caller's deadline is the only timer. A caller that gives up (its deadline, a cancel)
leaves the connection suspect, since the replies queued behind it may never come: the lane
closes it, every caller still waiting gets the error at once, and the next call reconnects.
A caller failed that way may have had its command run all the same: only idempotent commands
ride the lane (reads, and the submit script, which accepts its own record again), so that the
callers can simply try again.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as LostConnection
from redis.exceptions import ResponseError

Arg = bytes | bytearray | str | int
# Arguments larger than this are written as they are, not copied into the command's bytes.
_COPY_LIMIT = 16 * 1024


def pack(*args: Arg) -> list[bytes | bytearray]:
    """A command in Redis's protocol (RESP), as the buffers to write: what redis-py's
    ``pack_command`` makes."""
    out: list[bytes | bytearray] = []
    head = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        if len(arg) > _COPY_LIMIT:
            head.append(b"$%d\r\n" % len(arg))
            out += (b"".join(head), arg)
            head = [b"\r\n"]
        else:
            head.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    out.append(b"".join(head))
    return out


class Lane:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # held until done: the loop's are weak

    async def call(self, command: list[bytes | bytearray]) -> Any:
        """Send ``command`` (``pack``) and return its reply, undecoded."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # The future joins the queue and the command the socket in one step (no await between,
        # and a connected connection writes before its first await): the order of the queue is
        # the order of the replies.
        self._waiting.append(future)
        try:
            # (bytearrays too: the command's buffers go to the transport's writelines)
            await conn.send_packed_command(cast(list[bytes], command), check_health=False)
            return await future
        except BaseException as exc:
            if not future.done() or future.cancelled():
                self._close(conn, exc)
            raise

    async def _connect(self) -> AbstractConnection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.is_connected:
                return conn
            # No socket timeout of its own: the reader waits as long as replies are owed, and
            # the callers' deadlines bound every wait.
            kwargs = {**self._pool.connection_kwargs, "socket_timeout": None}
            conn = self._pool.connection_class(**kwargs)
            await conn.connect()  # type: ignore[no-untyped-call]
            self._conn = conn
            self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            return conn

    async def _read(self, conn: AbstractConnection) -> None:
        try:
            while True:
                try:
                    reply: Any = await conn.read_response(disable_decoding=True)
                except ResponseError as exc:  # an error reply: the connection is fine
                    reply = exc
                future = self._waiting.popleft()
                if future.done():
                    continue  # its caller gave up
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # A reply with no one waiting for it (IndexError) is a lost order: start afresh.
            self._close(conn, exc)

    def _close(self, conn: AbstractConnection, exc: BaseException) -> None:
        """Drop ``conn`` and fail everyone waiting on it: their replies will not come."""
        if self._conn is not conn:
            return
        self._conn = None
        waiting, self._waiting = self._waiting, collections.deque()
        lost = LostConnection(f"the status connection was closed: {exc!r}")
        for future in waiting:
            if not future.done():
                future.set_exception(lost)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        closing = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._conn is not None:
            self._close(self._conn, LostConnection("closed"))
        await asyncio.gather(*self._closing, return_exceptions=True)
