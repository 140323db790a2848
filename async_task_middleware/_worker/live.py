"""A streamed response relayed while it is produced: the endpoint's pieces, in batches, to Redis.

The endpoint's ``send`` only hands a piece to the relay, which never makes it wait on Redis or
on a reader. One flusher per replay writes what has gathered (``STREAM``): at once when the
last write began ``BATCH_DELAY`` ago or more (a token after a pause is not held back), else
``BATCH_DELAY`` after that write began, or sooner when it holds ``BATCH_SIZE`` or the response
ended. So a piece waits at most ``BATCH_DELAY``, and a task writes (and wakes its readers) at
most once per ``BATCH_DELAY`` however fast its endpoint sends: one call per batch, from a
thread, never on the event loop that other replays share. A response sent in one piece, as
most are, is never relayed: it costs nothing. The end of the response is not a write of its
own: readers end their answer with the task's outcome (``FINISH`` and its note), so that an
answer that looks complete is one the status URL already serves.

Redis keeps the body so far as one string (``<p>stream-<id>``), appended to batch by batch, and
its head beside it (``<p>head-<id>``): byte offsets are what readers ask for (``Range``, the
bytes produced), and one ``GETRANGE`` serves any of them. A Redis Stream's entries would have to
be mapped back to offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from .._shared.wire import served_headers

logger = logging.getLogger(__name__)

#: The longest a piece waits before it is written, and the shortest time between two writes.
BATCH_DELAY = 0.02
#: A batch this large is written at once.
BATCH_SIZE = 16 * 1024

#: ``write(batch, head, offset)``: one batch, the head as JSON, and the offset the batch starts
#: at; False when the task is gone or ended (nothing more is written).
Write = Callable[[bytes, bytes, int], bool]


class Relay:
    def __init__(
        self,
        write: Write,
        status: int,
        headers: list[tuple[bytes, bytes]],
        attempt: int,
        limit: int,
    ) -> None:
        self._write = write
        self._head = {
            "status": status,
            "headers": served_headers(headers),
            "attempt": attempt,
            "limit": limit,
        }
        self._pieces: list[bytes] = []
        self._gathered = 0
        self._oldest = 0.0
        self._last = -BATCH_DELAY  # when the last write began
        self._written = 0
        self._ended = False
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    def add(self, piece: bytes, last: bool) -> None:
        """A piece the endpoint sent (on the event loop: never waits)."""
        first = not self._pieces
        if piece:
            if first:
                self._oldest = self._loop.time()
            self._pieces.append(piece)
            self._gathered += len(piece)
        self._ended = self._ended or last
        if first or self._urgent:
            self._wake.set()

    @property
    def _urgent(self) -> bool:
        return self._ended or self._gathered >= BATCH_SIZE

    async def close(self) -> None:
        """The response is complete: write the rest, and wait until it is written."""
        self.add(b"", True)
        await self._task

    def abort(self) -> None:
        """The replay failed: write nothing more (its outcome says the rest)."""
        self._task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                if not self._pieces and not self._ended:
                    await self._wake.wait()
                    continue
                due = max(self._oldest, self._last + BATCH_DELAY)
                if not self._urgent and self._loop.time() < due:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(due):
                            await self._wake.wait()
                    if not self._urgent and self._loop.time() < due:
                        continue  # woken by the first piece after a write: wait on
                batch, ended = b"".join(self._pieces), self._ended
                if not batch:
                    return  # the end alone: readers end with the outcome (FINISH's note)
                self._pieces.clear()
                self._gathered = 0
                head = {**self._head, "produced": self._written + len(batch), "ended": ended}
                encoded = json.dumps(head, separators=(",", ":")).encode()
                self._last = self._loop.time()
                written = await self._loop.run_in_executor(
                    None, self._write, batch, encoded, self._written
                )
                if not written:
                    return  # deleted, or ended: its outcome is what readers get
                self._written += len(batch)
                if ended:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            # Readers wait for the outcome instead, and read the rest from it.
            logger.warning("a streamed response is no longer relayed", exc_info=True)
