"""A streamed response served live, to a caller that waits for it (``Prefer: wait``) or asks
for its bytes from an offset (``Range``), while the worker relays it (``_worker.live``).

The reader listens on the task's channel (``_web.events``: one subscription per process, however
many readers), reads the task's state once subscribed, and again on each note. Each read tells
how many bytes the response has; the reader sends those it has not sent yet (one ``GETRANGE`` a
piece, through the pool), and ends the response once the task has its outcome (any bytes not
sent yet then come from it), never on the head's own word that it ended: a caller told the
answer is complete finds the same answer at the status URL. A task that fails, is deleted, or
starts its response again (a new delivery) after the answer began ends it short: the server
closes the connection without the last chunk, so a reader never takes a cut body for a whole
one. A caller that goes away stops only its own reader: the task runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from .._shared.types import Receive, Send
from .._shared.wire import unpack_response
from .events import Note
from .headers import ByteRange
from .state import Head, StoreUnavailable, TaskState
from .store import TaskStore
from .wait import disconnected

#: How long a reader waits for Redis to confirm its subscription before it reads anyway.
_CONFIRM_TIMEOUT = 1.0
#: A reader whose subscription was lost reads this often instead.
_POLL = 0.5

#: Answers a task that ended before its live answer began, as the status URL would.
Final = Callable[[TaskState], Awaitable[None]]


async def serve_live(
    store: TaskStore,
    channel: bytes,
    task_id: str,
    send: Send,
    receive: Receive,
    extra: list[tuple[bytes, bytes]],
    wanted: ByteRange | None,
    final: Final,
    notes: asyncio.Queue[Note] | None = None,
) -> None:
    """Serve the task's response as it is produced; ``notes``: a subscription already open.
    StoreUnavailable when Redis fails before the answer began."""
    reader = _Reader(store, task_id, send, extra, wanted, final)
    if notes is not None:
        await reader.run(notes, receive)
        return
    async with store.events.listen(channel, _CONFIRM_TIMEOUT) as opened:
        await reader.run(opened, receive)


class _Reader:
    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        wanted: ByteRange | None,
        final: Final,
    ) -> None:
        self.store, self.task_id, self.send = store, task_id, send
        self.extra, self.wanted, self.final = extra, wanted, final
        self.started: Head | None = None  # the head the answer began with
        self.offset = 0  # the next byte to send
        self.last: int | None = None  # the last byte to send (a range's end)

    async def run(self, notes: asyncio.Queue[Note], receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        gone = loop.create_task(disconnected(receive))
        subscribed = True
        try:
            while not await self._step(await self.store.read_batched(self.task_id)):
                note = loop.create_task(notes.get())
                done, _ = await asyncio.wait(
                    {gone, note},
                    timeout=None if subscribed else _POLL,
                    return_when="FIRST_COMPLETED",
                )
                note.cancel()
                if gone in done:
                    return
                if note in done and note.result() is None:
                    subscribed = False
                while not notes.empty():  # one read serves every note that came meanwhile
                    if notes.get_nowait() is None:
                        subscribed = False
        except StoreUnavailable:
            if self.started is None:
                raise  # nothing sent yet: a 503
            # else ended short: Redis is gone, and with it what the answer would go on with
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone

    async def _step(self, state: TaskState) -> bool:
        """Send what ``state`` has that was not sent yet; True once the answer is over."""
        if state.final:
            if self.started is None:
                await self.final(state)
            elif state.outcome is not None and not state.failed:
                await self._rest(state)
            return True  # else it failed or was deleted: ended short
        head = state.head
        if self.started is not None and (head is None or head.attempt != self.started.attempt):
            return True  # a new delivery began the response again: ended short
        if head is None:
            return False
        if self.started is None and not await self._begin(head):
            return False
        while self.offset < self._end(head.produced):
            piece = await self.store.streamed(self.task_id, self.offset, self._end(head.produced))
            if not piece:
                return False  # it ended meanwhile: the outcome holds the rest
            await self._body(piece)
        if self.last is not None and self.offset > self.last:
            await self.send({"type": "http.response.body", "body": b""})
            return True
        # Even once the head says the response ended, its last chunk waits for the outcome
        # (FINISH's note): an answer that looks complete is one the status URL serves too.
        return False

    def _end(self, produced: int) -> int:
        return produced if self.last is None else min(produced, self.last + 1)

    async def _begin(self, head: Head) -> bool:
        """Start the answer, once ``head`` holds a byte of it (or ended); False: not yet."""
        wanted = self.wanted if head.status == 200 else None
        headers = [*head.headers, *self.extra]
        if wanted is None:
            self.started = head
            await self.send(
                {"type": "http.response.start", "status": head.status, "headers": headers}
            )
            return True
        if head.ended:
            span = wanted.resolve(head.produced)
            if span is None:
                return False  # answered from the outcome (a 416), once it is stored
            first, self.last = span
            total = str(head.produced)
            length = [(b"content-length", b"%d" % (self.last - first + 1))]
        elif wanted.start is None or head.produced <= wanted.start:
            return False  # a suffix needs the length; a start not produced yet, its byte
        else:
            first, self.last = wanted.start, wanted.end
            total, length = "*", []
        # Live, the last byte is the most the response may reach (RFC 8673's "very large" end).
        last = self.last if self.last is not None else head.limit - 1
        self.offset = first
        self.started = head
        headers.append((b"content-range", f"bytes {first}-{last}/{total}".encode()))
        await self.send({"type": "http.response.start", "status": 206, "headers": headers + length})
        return True

    async def _body(self, piece: bytes) -> None:
        self.offset += len(piece)
        await self.send({"type": "http.response.body", "body": piece, "more_body": True})

    async def _rest(self, state: TaskState) -> None:
        """The bytes not sent yet, from the task's outcome, then the end."""
        assert state.outcome is not None
        _, headers, body = unpack_response(state.outcome)
        if body is None:  # kept apart: read in pieces
            length = int(next((v for n, v in headers if n == b"content-length"), b"0"))
            async with contextlib.aclosing(
                self.store.body(self.task_id, self._end(length), self.offset)
            ) as pieces:
                async for piece in pieces:
                    await self._body(piece)
        else:
            await self._body(body[self.offset : self._end(len(body))])
        await self.send({"type": "http.response.body", "body": b""})
