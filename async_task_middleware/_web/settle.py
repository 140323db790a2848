"""Settling a submission whose outcome is unknown: taken back for good, or found begun.

A settle runs as a task of its own, so that one that needs longer than the submission's
deadline goes on after the 503 has gone out, tried again until Redis answers; a shutdown waits
for those still under way (docs/how-it-works.md: "A 503 promised nothing").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from .state import StoreUnavailable, Submission

logger = logging.getLogger(__name__)

# A settle that outlives its answer is tried again until Redis answers, for at most this
# long.
_LATE_SETTLE = 60.0


class Settles:
    def __init__(self, retract: Callable[[Submission], Awaitable[bool]]) -> None:
        self._retract = retract
        self._pending: set[asyncio.Task[bool]] = set()  # held until done: the loop's are weak

    async def settle(self, sub: Submission, seconds: float) -> bool:
        """``retract`` within ``seconds``: True when a worker already began ``sub``. One that
        needs longer goes on in the background, and logs how it ended."""
        settle = asyncio.get_running_loop().create_task(self._until_done(sub))
        self._pending.add(settle)
        settle.add_done_callback(self._pending.discard)
        try:
            async with asyncio.timeout(max(seconds, 0)):
                return await asyncio.shield(settle)  # a client that leaves cancels its wait only
        except TimeoutError:
            settle.add_done_callback(functools.partial(_settled_late, sub.task_id))
            return False
        except StoreUnavailable:
            return False

    async def _until_done(self, sub: Submission) -> bool:
        give_up = time.monotonic() + _LATE_SETTLE
        delay = 0.05
        while True:
            try:
                return await self._retract(sub)
            except StoreUnavailable:
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def aclose(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for the settles under way (each decides whether a task
        answered 503 may run), then cancel the rest."""
        if self._pending:
            _, late = await asyncio.wait(self._pending, timeout=wait)
            for settle in late:
                settle.cancel()


def _settled_late(task_id: str, settle: asyncio.Task[bool]) -> None:
    if settle.cancelled() or settle.exception() is not None:
        logger.error("task %s, answered 503, could not be settled: Redis did not answer", task_id)
    elif settle.result():
        logger.error("task %s, answered 503, was begun by a worker before it was settled", task_id)
    else:
        logger.info("task %s, answered 503, was settled after its answer: taken back", task_id)
