"""One pipelined Redis connection per event loop, for the status reads and small submissions.

A status poll is one ``MGET``. Through redis-py's pool it costs more in the client than in
Redis: a checkout and a release under the pool's lock, a task and a timer for the socket
deadline, the command packed argument by argument. The lane instead keeps one connection,
made by the store's own pool (so TLS, Sentinel, ACL user, database and client name are
exactly the store's), and hands the replies, which Redis sends in order, to the callers in the
order they wrote. The commands asked for in one turn of the event loop go out in one write at
its end: under load that is one system call for many requests instead of one each, and no
command waits longer than the turn it was asked in. Their replies arrive in one read too.
Nothing waits for the socket's buffer to drain: every command is small (``_LANE_LIMIT``), and
the callers' deadlines bound how many can be owed at once.

Each call has a deadline, and one timer watches them all: it is set for the earliest deadline
owed, and when it fires finds the calls whose deadline passed (``asyncio.timeout`` per call
would cost a timer each, several microseconds on every status read). A call past its deadline,
or a caller that gives up (a cancel), leaves the connection suspect, since the replies queued
behind it may never come: the lane closes it, the late callers get ``TimeoutError``, the others
still waiting the lost connection (theirs to try again, within their own deadlines), and the
next call reconnects.
A caller failed that way may have had its command run all the same: only idempotent commands
ride the lane (reads, and the submit script, which accepts its own record again), so that the
callers can simply try again.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any, cast

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as LostConnection
from redis.exceptions import ResponseError

Arg = bytes | bytearray | str | int
# Arguments larger than this are written as they are, not copied into the command's bytes.
_COPY_LIMIT = 16 * 1024
# The watch's timer may fire this early (the loop's timers round to the millisecond).
_EARLY = 0.001


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
        # Each call's reply, and its deadline, in the order the replies will come.
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = math.inf
        self._reader: asyncio.Task[None] | None = None
        self._unsent: list[bytes | bytearray] | None = None  # this turn's commands, to write
        self._closing: set[asyncio.Task[None]] = set()  # held until done: the loop's are weak

    async def call(self, command: list[bytes | bytearray], deadline: float) -> Any:
        """Send ``command`` (``pack``) and return its reply, undecoded; ``TimeoutError`` once
        the loop's clock passes ``deadline`` without it."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            async with asyncio.timeout_at(deadline):
                conn = await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # The future joins the queue and the command this turn's write in one step (no await
        # between): the order of the queue is the order of the replies.
        self._waiting.append((future, deadline))
        if deadline < self._watch_at:
            self._watch_from(loop, deadline)
        unsent = self._unsent
        if unsent is None:
            unsent = self._unsent = []
            loop.call_soon(self._write, conn, unsent)
        unsent += command
        try:
            return await future
        except BaseException as exc:
            if not future.done() or future.cancelled():
                self._close(conn, exc)
            raise

    def _watch_from(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch_at = when
        self._watch = loop.call_at(when, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        """The earliest deadline owed came: close the connection if a reply is still owed
        past its deadline, else watch for the next one."""
        self._watch, self._watch_at = None, math.inf
        now = loop.time() + _EARLY
        owed = [deadline for future, deadline in self._waiting if not future.done()]
        if not owed:
            return
        first = min(owed)
        if first > now:
            self._watch_from(loop, first)
        elif self._conn is not None:
            self._close(self._conn, TimeoutError("Redis did not answer in time"), now)

    def _write(self, conn: AbstractConnection, unsent: list[bytes | bytearray]) -> None:
        """The turn's commands, in one write (at the end of the turn they were asked in)."""
        if self._unsent is unsent:
            self._unsent = None
        if self._conn is not conn or conn._writer is None:
            return  # closed meanwhile: their callers have their error already
        try:
            # (bytearrays too: the transport's writelines takes any buffer)
            conn._writer.writelines(cast(list[bytes], unsent))
        except Exception as exc:
            self._close(conn, exc)

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
                future, _ = self._waiting.popleft()
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

    def _close(self, conn: AbstractConnection, exc: BaseException, now: float = -1.0) -> None:
        """Drop ``conn`` and fail everyone waiting on it: their replies will not come. Those
        whose deadline is ``now`` or before get ``TimeoutError``, the others the lost
        connection."""
        if self._conn is not conn:
            return
        self._conn = None
        self._unsent = None  # the next connection's commands start a write of their own
        waiting, self._waiting = self._waiting, collections.deque()
        lost = LostConnection(f"the status connection was closed: {exc!r}")
        for future, deadline in waiting:
            if not future.done():
                late = deadline <= now
                future.set_exception(TimeoutError("Redis did not answer in time") if late else lost)
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
