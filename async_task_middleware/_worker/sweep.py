"""The sweep after a Redis restart or failover, and where a worker starts: no accepted task is
left behind.

kombu's Redis transport takes a message off the queue (``BRPOP``) and only then, in a second
command, records it as unacknowledged. A Redis killed between the two (a SIGKILL, a master lost
to a Sentinel failover) keeps neither, nor does a worker killed between them (an OOM kill, a
lost node), and the task's record would say "queued" until it expires. So the submit script
keeps a copy of each message it pushes until a worker begins the task (``<p>message-<id>``),
and one worker's sweeper compares the copies with the queues and kombu's ``unacked`` hash, and
pushes again the messages it found in neither, of tasks no worker began: after every change of
Redis (its ``run_id`` is not the one the last sweep stored), once where each worker starts (a
worker killed whole is started again, by hand or by its supervisor), and when a worker has not
been heard from for ``DEAD_AFTER`` (one killed while the others run on and none is started in
its place). Each sweeper says it is alive every ``INTERVAL`` in a sorted set of Redis's own
clock times, so hosts' clocks do not matter; one that stops cleanly leaves the set.

It looks twice, ``PASS_GAP`` apart, and pushes only what was missing both times: a message on
its way from the queue to the unacknowledged hash (or given back by kombu's restore) between two
reads of one pass is not taken for lost. The push itself re-checks, in one script, that the task
is still unbegun and its copy still there (``REPUBLISH``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import uuid

from celery import Celery
from redis.exceptions import RedisError

from .._shared import scripts as _scripts
from .._shared.binding import Binding
from .._shared.metrics import pushed_again

logger = logging.getLogger(__name__)

#: How often each worker asks Redis for its run_id.
INTERVAL = 5.0
#: Between the two looks of one sweep.
PASS_GAP = 5.0
#: A worker not heard from for this long is taken for killed. Well above ``INTERVAL``: taking a
#: slow worker for a killed one costs no more than a sweep.
DEAD_AFTER = 30.0
_CHUNK = 100  # messages read at a time: they carry request bodies
#: Keys a ``SCAN`` step looks at. Redis's default, 10, took a round trip per 10 keys of the
#: whole database (results and records included) to find the few copies among them.
_SCAN_COUNT = 1000
_TASK_ID = re.compile(rb'"id":\s*"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"')


class Sweeper(threading.Thread):
    def __init__(self, celery_app: Celery, binding: Binding) -> None:
        super().__init__(name="async-task-middleware-sweep", daemon=True)
        # The native publish path is on: the broker's queues are in the store's Redis.
        self._client = celery_app.backend.client
        self._republish = self._client.register_script(_scripts.REPUBLISH)
        self._binding = binding
        options = celery_app.conf.broker_transport_options or {}
        self._unacked = options.get("unacked_key", "unacked")
        self._run_key = binding.record_prefix + b"redis-run"
        self._lock_key = binding.record_prefix + b"sweeping"
        self._workers_key = binding.record_prefix + b"workers"
        self._me = uuid.uuid4().hex
        self._stopped = threading.Event()
        self._swept = False  # since this worker started

    def run(self) -> None:
        # At once first: a worker started after a restart, or in place of one killed, finds
        # what the restart or the kill dropped.
        while True:
            try:
                self.sweep_if_due()
            except RedisError as exc:
                # Redis is away (restarting, failing over): the next round sweeps.
                logger.warning("sweep not done: %s", type(exc).__name__)
            if self._stopped.wait(INTERVAL):
                return

    def stop(self) -> None:
        self._stopped.set()
        # Stopped, not killed: no sweep is due. Should Redis be away, the others take this
        # worker for killed and sweep once: no harm.
        with contextlib.suppress(RedisError):
            self._client.zrem(self._workers_key, self._me)

    def sweep_if_due(self) -> int | None:
        """Sweep if this worker has not since it started, if Redis changed since the last
        sweep, or if a worker was not heard from for ``DEAD_AFTER``; the number of tasks pushed
        again (None: no sweep)."""
        run_id = str(self._client.info("server")["run_id"]).encode()
        silent_since, silent = self._heard()
        if self._swept and not silent and self._client.get(self._run_key) == run_id:
            return None
        if not self._client.set(self._lock_key, run_id, nx=True, ex=120):
            return None  # another worker sweeps; this one's turn comes after
        try:
            lost = self.missing()
            if lost:
                if self._stopped.wait(PASS_GAP):
                    return None  # stopping: one look is not enough; the next sweep looks again
                lost &= self.missing()
            b = self._binding
            pushed = sum(
                self._republish(
                    keys=[
                        b.record_key(task_id),
                        b.attempts_key(task_id),
                        b.heartbeat_key(task_id),
                        b.message_key(task_id),
                    ]
                )
                for task_id in sorted(lost)
            )
            self._client.set(self._run_key, run_id)
            # Only those still silent: one heard from again meanwhile stays.
            self._client.zremrangebyscore(self._workers_key, "-inf", silent_since)
            self._swept = True
        finally:
            self._client.delete(self._lock_key)
        if silent:
            logger.warning(
                "%d workers not heard from for %g s (killed?): swept for what they held",
                silent,
                DEAD_AFTER,
            )
        if pushed:
            pushed_again(pushed)
            logger.warning(
                "%d tasks lost by the broker (a Redis restart, or a worker killed as it took "
                "them) pushed again",
                pushed,
            )
        return int(pushed)

    def _heard(self) -> tuple[float, int]:
        """Say this worker is alive; the time before which a worker is silent, and how many
        are."""
        now, _ = self._client.time()
        silent_since = now - DEAD_AFTER
        pipe = self._client.pipeline(transaction=False)
        if not self._stopped.is_set():  # stopping, it has left the set
            pipe.zadd(self._workers_key, {self._me: now})
        pipe.zcount(self._workers_key, "-inf", silent_since)
        silent = pipe.execute()[-1]
        return silent_since, int(silent)

    def missing(self) -> set[str]:
        """Tasks with a kept copy, unbegun, whose message is in no queue and not unacked."""
        prefix = self._binding.record_prefix + b"message-"
        keys = self._client.scan_iter(prefix + b"*", count=_SCAN_COUNT)
        copies = [key[len(prefix) :].decode() for key in keys]
        if not copies:
            return set()
        pipe = self._client.pipeline(transaction=False)
        for task_id in copies:
            pipe.hget(self._binding.message_key(task_id), "queue")
            pipe.exists(self._binding.attempts_key(task_id))
        answers = pipe.execute()
        queues = {queue for queue in answers[::2] if queue is not None}
        candidates = {
            task_id
            for task_id, queue, begun in zip(copies, answers[::2], answers[1::2], strict=True)
            if queue is not None and not begun
        }
        seen: set[str] = set()
        for queue in queues:
            start = 0
            while chunk := self._client.lrange(queue, start, start + _CHUNK - 1):
                seen.update(_ids(chunk))
                start += _CHUNK
        for _, message in self._client.hscan_iter(self._unacked, count=_CHUNK):
            seen.update(_ids([message]))
        return candidates - seen


def _ids(messages: list[bytes]) -> set[str]:
    return {found.decode() for message in messages for found in _TASK_ID.findall(message)}
