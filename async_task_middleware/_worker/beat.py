"""One heartbeat for all the replays a worker process runs.

Every ``interval`` a thread renews, in one script call per 500 replays, the heartbeat and the
record of each running replay (``BEAT``), and cancels those whose record is gone (deleted:
stop the task). A replay's own thread, if it has one, then makes one blocking wait for its
outcome instead of waking twice a second to ask Redis alone: with thousands of I/O-bound
replays in a process, that is one round trip per interval instead of thousands. The beater
also notices a replay past its deadline that no thread waits for (the replay pool's).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from .._shared import scripts as _scripts
from .._shared.binding import Binding

logger = logging.getLogger(__name__)

#: Replays renewed by one script call: thousands in one would hold Redis up for a while.
BEAT_BATCH = 500


@dataclass
class Beat:
    """A running replay, as the beater knows it."""

    future: concurrent.futures.Future[Any]
    #: When the replay should be done by (``time.monotonic``), and what to call if it is not:
    #: the replay pool has no thread waiting on it to notice a blocked loop.
    deadline: float = math.inf
    overdue: Callable[[], None] | None = None
    cancelled: bool = field(default=False)


class Beater(threading.Thread):
    def __init__(self, client: Any, binding: Binding, interval: float, heartbeat_ms: int) -> None:
        super().__init__(name="async-task-middleware-beat", daemon=True)
        self.pid = os.getpid()
        self._client = client
        self._script = client.register_script(_scripts.BEAT)
        self._binding = binding
        self._interval = interval
        self._heartbeat_ms = heartbeat_ms
        self._running: dict[str, Beat] = {}
        self._lock = threading.Lock()

    def add(
        self, task_id: str, future: concurrent.futures.Future[Any], deadline: float = math.inf
    ) -> Beat:
        beat = Beat(future, deadline)
        with self._lock:
            self._running[task_id] = beat
        return beat

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)

    def run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self._interval):
            try:
                self.check_deadlines()
                self.beat()
            except Exception as exc:
                # The next round tries again; a replay is never stopped for a missed beat,
                # and this thread, which every running replay relies on, never ends early.
                unexpected = not isinstance(exc, RedisError)
                logger.warning("heartbeat not renewed: %r", exc, exc_info=unexpected)

    def check_deadlines(self) -> None:
        """Call ``overdue`` of the replays past their deadline, once; Redis or not."""
        now = time.monotonic()
        with self._lock:
            late = [b for b in self._running.values() if b.overdue and b.deadline < now]
        for beat in late:
            overdue, beat.overdue = beat.overdue, None
            if overdue is not None and not beat.future.done():
                overdue()

    def beat(self) -> None:
        with self._lock:
            running = list(self._running.items())
        if not running:
            return
        b = self._binding
        for at in range(0, len(running), BEAT_BATCH):
            batch = running[at : at + BEAT_BATCH]
            keys = [k for t, _ in batch for k in (b.record_key(t), b.heartbeat_key(t))]
            alive = self._script(keys=keys, args=[b.expires, self._heartbeat_ms])
            for (task_id, beat), ok in zip(batch, alive, strict=True):
                if not ok:
                    logger.info("task %s was deleted: stopping it", task_id)
                    beat.cancelled = True
                    beat.future.cancel()


_beaters: dict[int, Beater] = {}
_beaters_lock = threading.Lock()


def process_beater(client: Any, binding: Binding, interval: float, heartbeat_ms: int) -> Beater:
    """This process's beater for ``binding``, started on first use (so that a forked pool
    child starts its own)."""
    key = id(binding)
    with _beaters_lock:
        beater = _beaters.get(key)
        if beater is None or beater.pid != os.getpid():
            beater = _beaters[key] = Beater(client, binding, interval, heartbeat_ms)
            beater.start()
        return beater
