"""Leases: a live worker keeps renewing its claim on every message it holds.

kombu's Redis transport keeps each delivered, unacknowledged message in the ``unacked`` hash and
its delivery time in the ``unacked_index`` sorted set; any worker gives back to the queue the
messages whose time is older than ``visibility_timeout`` (``restore_visible``). That is how the
tasks of a worker that died whole come back, and why, with the default of an hour, they come
back an hour later; while a shorter timeout hands a long task that is still running to a
second worker (celery/celery#5935).

The lease keeper runs in the worker's main process, which holds every message its pool
processes or threads run or have reserved, and sets their time in ``unacked_index`` to now every
quarter of the visibility timeout. A message held by a live worker is then never older than the
timeout, whatever the task's length; the messages of a dead worker stop being renewed and are
given back within the timeout (plus kombu's restore interval). So the visibility timeout can be
short (the example uses 60 s), and ``register_replay`` no longer needs the time limit below it.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from celery.worker import state as worker_state

logger = logging.getLogger(__name__)

DEFAULT_VISIBILITY = 3600.0


def visibility_timeout(celery_app: Celery) -> float:
    options = celery_app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", DEFAULT_VISIBILITY))


def held_delivery_tags() -> list[str]:
    """The delivery tags of every message this worker holds: reserved, running, or waiting for
    its time (a countdown or an ETA: a webhook's retry), which kombu would otherwise give back
    to the queue once it waited past the visibility timeout, to run again beside it."""
    tags: list[str] = []
    held = (
        *worker_state.reserved_requests,
        *worker_state.active_requests,
        *worker_state.scheduled_requests,
    )
    for request in held:
        tag = getattr(request.message, "delivery_tag", None)
        if isinstance(tag, str | bytes):
            tags.append(tag.decode() if isinstance(tag, bytes) else tag)
    return tags


class LeaseKeeper(threading.Thread):
    """Renews the held messages' entries in ``unacked_index`` from a daemon thread."""

    def __init__(self, celery_app: Celery) -> None:
        super().__init__(name="async-task-middleware-leases", daemon=True)
        options = celery_app.conf.broker_transport_options or {}
        self.interval = visibility_timeout(celery_app) / 4
        # kombu's own client adds any global_keyprefix to the key by itself.
        self.index_key = options.get("unacked_index_key", "unacked_index")
        # The broker as kombu connects to it (Sentinel, TLS, user, its socket timeouts):
        # whatever reaches the unacked index reaches it here too.
        self._connection = celery_app.connection_for_write()
        self._stopped = threading.Event()

    def renew(self) -> int:
        """Set every held message's delivery time to now; the number renewed."""
        tags = held_delivery_tags()
        if not tags:
            return 0
        now = time.time()
        with self._connection.default_channel.conn_or_acquire() as client:
            # XX: only entries that exist; a message acknowledged meanwhile is not brought back.
            renewed: int = client.zadd(self.index_key, dict.fromkeys(tags, now), xx=True, ch=True)
        return renewed

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.renew()
            except Exception as exc:
                # The next round tries again (kombu reconnects: a restart, a failover); the
                # worker's own consumer is not touched.
                logger.warning("leases not renewed: %s", type(exc).__name__)

    def stop(self) -> None:
        self._stopped.set()
