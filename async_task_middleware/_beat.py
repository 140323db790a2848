"""One heartbeat for all the replays a worker process runs.

Every ``interval`` a thread renews, in one pipeline, the heartbeat and the record of each running
replay (``BEAT``), and cancels those whose record is gone (deleted: stop the task). A replay's
own thread then makes one blocking wait for its outcome instead of waking twice a second to
ask Redis alone: with thousands of I/O-bound replays in a threads-pool process, that is one
round trip per interval instead of thousands.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from . import _scripts
from ._celery import Binding

logger = logging.getLogger(__name__)


@dataclass
class Beat:
    """A running replay, as the beater knows it."""

    future: concurrent.futures.Future[Any]
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

    def add(self, task_id: str, future: concurrent.futures.Future[Any]) -> Beat:
        beat = Beat(future)
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
                self.beat()
            except RedisError as exc:
                # The next round tries again; a replay is never stopped for a missed beat.
                logger.warning("heartbeat not renewed: %s", type(exc).__name__)

    def beat(self) -> None:
        with self._lock:
            running = list(self._running.items())
        if not running:
            return
        b = self._binding
        pipe = self._client.pipeline(transaction=False)
        for task_id, _ in running:
            self._script(
                keys=[b.record_key(task_id), b.heartbeat_key(task_id)],
                args=[b.expires, self._heartbeat_ms],
                client=pipe,
            )
        for (task_id, beat), alive in zip(running, pipe.execute(), strict=True):
            if not alive:
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
