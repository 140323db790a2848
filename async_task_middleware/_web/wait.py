"""Waiting for a task to end, for ``Prefer: wait`` on a submission or a status URL.

The waiter listens on the task's channel (``_web.events``), reads the state once the subscription
is confirmed, and again on each note, until the task ends or the wait runs out; then it reads
once more. A client that disconnects ends the wait at once and frees what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .._shared.metrics import waiting
from .._shared.types import Receive
from .events import Note
from .state import TaskState
from .store import TaskStore

# How long a waiter waits for Redis to confirm its subscription before it reads anyway.
_CONFIRM_TIMEOUT = 1.0


async def wait_for_end(
    store: TaskStore,
    channel: bytes,
    task_id: str,
    seconds: float,
    receive: Receive,
    notes: asyncio.Queue[Note] | None = None,
    *,
    live: bool = False,
) -> TaskState | None:
    """The task's state once it ended (or, ``live``, once its response began streaming), or
    after ``seconds``; None when the client left. ``notes``: a subscription already opened
    (before the task was submitted)."""
    with waiting():
        if notes is None:
            async with store.events.listen(channel, min(seconds, _CONFIRM_TIMEOUT)) as opened:
                return await _wait(store, task_id, seconds, receive, opened, live)
        return await _wait(store, task_id, seconds, receive, notes, live)


async def _wait(
    store: TaskStore,
    task_id: str,
    seconds: float,
    receive: Receive,
    notes: asyncio.Queue[Note],
    live: bool,
) -> TaskState | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    def over(state: TaskState) -> bool:
        return state.final or (live and state.head is not None)

    state = await store.read_batched(task_id)
    if over(state):
        return state
    gone = loop.create_task(disconnected(receive))
    try:
        subscribed = True
        while not over(state):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiters: set[asyncio.Future[Any]] = {gone}
            note = loop.create_task(notes.get()) if subscribed else None
            if note is not None:
                waiters.add(note)
            done, _ = await asyncio.wait(waiters, timeout=remaining, return_when="FIRST_COMPLETED")
            if note is not None and note not in done:
                note.cancel()
            if gone in done:
                return None
            if note is None or note not in done:
                state = await store.read_batched(task_id)  # the deadline: one last read
                break
            if note.result() is None:
                subscribed = False  # the subscription was lost: read at the deadline instead
                continue
            state = await store.read_batched(task_id)
        return state
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
