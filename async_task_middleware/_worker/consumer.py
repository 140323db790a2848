"""Celery's worker consumer, with two changes.

Celery acknowledges a message it cannot decode, logs it whole and moves on: the task's record
would then say "queued" until it expires, a day later, and the log would hold the request. For
a message that names the replay task, this consumer stores the failure instead (the status URL
answers 500) and logs only the id.

When Redis dies under it, Celery closes the broken connection before reconnecting; kombu's
Redis channel then tries to give back its unacknowledged messages through that connection,
which may already have no client: an ``AttributeError`` that Celery takes for unrecoverable,
and the worker exits (seen in the fault suite's Redis-restart scenario). Here that close fails
quietly instead; the messages stay in kombu's unacked hash, whose restore (or the next worker's)
gives them back.

With a Redis broker, kombu makes a new Redis client (and its table of some 200 reply
callbacks) for every message it takes and every acknowledgement: a third of the consumer's
time when thousands of replays are in flight. Here each channel makes one and keeps it; a
client over a connection pool holds no state of its own, and the pool stays kombu's.

``register_replay`` installs this consumer unless the app has chosen its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis

from .._shared.binding import TASK_NAME
from .._shared.wire import WireFormatError

logger = logging.getLogger(__name__)

DEFAULT = "celery.worker.consumer:Consumer"
PATH = "async_task_middleware._worker.consumer:Consumer"


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        connection = self.app.connection_for_read(heartbeat=heartbeat)
        transport = connection.transport  # made here, connected below: its first channel too
        if isinstance(transport, kombu_redis.Transport):  # Sentinel's too; not RabbitMQ's
            transport.Channel = _keeping_client(transport.Channel)
        return self.ensure_connected(connection)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = headers.get("id")
        if headers.get("task") != TASK_NAME or not isinstance(task_id, str):
            super().on_decode_error(message, exc)
            return
        logger.error(
            "task %s failed: its message cannot be decoded (%s)", task_id, type(exc).__name__
        )
        try:
            self.app.backend.mark_as_failure(
                task_id, WireFormatError("the task's message could not be decoded")
            )
        finally:
            message.ack()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            close = connection.close

            def closing() -> None:
                try:
                    close()
                except AttributeError as error:  # kombu's restore through a released client
                    logger.warning("broker connection closed uncleanly: %s", error)

            connection.close = closing
        super().on_connection_error_after_connected(exc)


_kept: dict[type[Any], type[Any]] = {}


def _keeping_client(channel_class: type[Any]) -> type[Any]:
    """``channel_class`` (kombu's Redis or Sentinel channel, or an app's subclass of them)
    keeping one client."""
    if issubclass(channel_class, _Keeping):
        return channel_class
    if channel_class not in _kept:
        _kept[channel_class] = type(channel_class.__name__, (_Keeping, channel_class), {})
    return _kept[channel_class]


class _Keeping:
    """One client per channel, made again when kombu replaces the channel's pool."""

    _client_kept: Any = None
    pool: Any  # kombu's, as is ``_create_client``
    _create_client: Any

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        kept = self._client_kept
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._client_kept = self._create_client()
        yield kept
