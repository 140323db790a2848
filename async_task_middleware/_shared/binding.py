"""What the middleware and the worker take from the user's Celery app, read and checked once.

Settings that would break a promise of the protocol are refused here, at start, with a message
that names the setting to change.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from redis.exceptions import RedisError

from .deployment import (
    CLUSTER_REFUSED,
    backend_deployment,
    broker_deployment,
    is_cluster,
    is_redis_backend,
)
from .errors import ConfigurationError as ConfigurationError
from .message import MessageTemplates

logger = logging.getLogger(__name__)

TASK_NAME = "async_task_middleware.replay"
#: The replay's hard time limit is its soft limit plus this: time to cancel cleanly first.
HARD_LIMIT_GRACE = 10.0
_AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def check_serializers(celery_app: Celery) -> None:
    """Only JSON crosses the broker: a pickle anywhere in the accept lists is arbitrary code
    execution for whoever can write to the broker or the result backend."""
    conf = celery_app.conf
    accepted = {
        "task_serializer": [conf.task_serializer],
        "result_serializer": [conf.result_serializer],
        "accept_content": list(conf.accept_content or []),
        "result_accept_content": list(conf.result_accept_content or []),
    }
    for setting, values in accepted.items():
        for value in values:
            if value not in ("json", "application/json"):
                raise ConfigurationError(
                    f"Celery setting {setting} includes {value!r}: async-task-middleware only "
                    "lets JSON cross the broker; set it to ['json'] (or 'json')"
                )
    if conf.result_extended:
        raise ConfigurationError(
            "Celery setting result_extended=True copies every request body into its result; "
            "set result_extended=False"
        )


def expires_seconds(celery_app: Celery) -> int:
    value = celery_app.conf.result_expires
    if value is None:
        raise ConfigurationError(
            "Celery setting result_expires=None keeps results forever; the submission record "
            "expires with the result, so give it a lifetime (default: 1 day)"
        )
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    return max(1, int(value))


def hard_time_limit(
    celery_app: Celery, soft_limit: float, *, leases: bool, amqp_consumer_timeout: float
) -> float:
    """The replay's hard limit, checked against the broker's own redelivery.

    Redis hands an unacknowledged message to another consumer once its delivery time is older
    than ``visibility_timeout``: without leases (``_worker.lease``) a replay that may run longer
    would run twice at once. RabbitMQ closes the channel of a consumer that holds a delivery longer
    than its ``consumer_timeout`` (30 minutes by default) and redelivers it.
    """
    hard_limit = soft_limit + HARD_LIMIT_GRACE
    conf = celery_app.conf
    if broker_deployment(celery_app) is not None:
        if leases:
            return hard_limit
        visibility = (conf.broker_transport_options or {}).get("visibility_timeout", 3600)
        if hard_limit >= visibility:
            raise ConfigurationError(
                f"the replay's hard time limit ({hard_limit:g} s: register_replay(time_limit=) "
                f"or task_time_limit, plus {HARD_LIMIT_GRACE:g} s) is not below the Redis "
                f"broker's visibility_timeout ({visibility:g} s, broker_transport_options"
                "['visibility_timeout']) and leases are off: Redis would deliver a running "
                "task a second time. Turn leases on, lower the time limit or raise "
                "visibility_timeout."
            )
    elif str(conf.broker_url).startswith(_AMQP_SCHEMES) and hard_limit >= amqp_consumer_timeout:
        raise ConfigurationError(
            f"the replay's hard time limit ({hard_limit:g} s) is not below RabbitMQ's "
            f"consumer_timeout ({amqp_consumer_timeout:g} s): RabbitMQ would close the "
            "channel and deliver the running task again. Raise consumer_timeout on the server "
            "and pass register_replay(amqp_consumer_timeout=) to match, or lower the limit."
        )
    return hard_limit


#: Socket timeouts where the app sets none: with none, a publish, a worker's fetch or a result
#: store waits forever on a frozen Redis master (kombu's default, and Celery's for connecting).
SOCKET_TIMEOUT = 5.0


def survive_failover(celery_app: Celery) -> None:
    """Celery settings without which a Redis restart or a Sentinel failover fails or hangs work.

    ``result_backend_always_retry``: Celery stores a result again instead of failing a task
    whose endpoint has finished, when the write meets the failover. Socket timeouts for the
    broker and the result backend, and health checks for the backend's connections, unless
    the app sets its own: a frozen master is then a timeout Celery and kombu recover from.
    """
    conf = celery_app.conf
    conf.result_backend_always_retry = True
    if conf.redis_socket_connect_timeout is None:
        conf.redis_socket_connect_timeout = SOCKET_TIMEOUT
    if conf.redis_socket_timeout is None:
        conf.redis_socket_timeout = SOCKET_TIMEOUT
    if not conf.get("redis_backend_health_check_interval"):
        # A connection idle this long is pinged before use: one left to a dead master fails
        # there, not in the middle of storing a result.
        conf.update(redis_backend_health_check_interval=25)
    if broker_deployment(celery_app) is not None:
        options = dict(conf.broker_transport_options or {})
        options.setdefault("socket_timeout", SOCKET_TIMEOUT)
        options.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
        conf.broker_transport_options = options


def refuse_cluster(celery_app: Celery) -> None:
    """Ask the result backend's Redis, once at the worker's start, whether it is a cluster node
    (blocking: the worker has no event loop to spare yet). An unreachable Redis is not
    refused: the worker waits for it as Celery does."""
    try:
        info = celery_app.backend.client.info("cluster")
    except RedisError as exc:
        logger.warning("could not ask Redis whether it is a cluster: %s", type(exc).__name__)
        return
    if is_cluster(info):
        raise ConfigurationError(CLUSTER_REFUSED)


def _check_confirms(conf: Any) -> None:
    url = conf.broker_url or "amqp://"
    if url.startswith(_AMQP_SCHEMES) and not (conf.broker_transport_options or {}).get(
        "confirm_publish"
    ):
        raise ConfigurationError(
            "the AMQP broker needs publisher confirms, so that a 303 is only sent for a task "
            "the broker took: set broker_transport_options={'confirm_publish': True}"
        )


@dataclass(frozen=True, slots=True)
class Binding:
    """The facts about one Celery app that every request needs, computed once."""

    celery_app: Celery
    meta_prefix: bytes
    record_prefix: bytes
    expires: int
    # The queue list to LPUSH to when the broker is the same Redis; None: publish through Celery.
    fast_queue: str | None
    # The messages to push there (``_shared.message``); None without a fast queue.
    messages: MessageTemplates | None

    @classmethod
    def of(cls, celery_app: Celery) -> Binding:
        """The task store is the result backend's Redis, on the web side and in the worker
        alike: a record kept anywhere else would be one the worker never finds."""
        check_serializers(celery_app)
        conf = celery_app.conf
        _check_confirms(conf)
        if not is_redis_backend(celery_app):
            raise ConfigurationError(
                f"the result backend {conf.result_backend!r} is not Redis: set the Celery "
                "setting result_backend to a redis://, rediss:// or sentinel:// URL"
            )
        backend_prefix = celery_app.backend.get_key_for_task("-")[:-1]
        global_prefix = (conf.result_backend_transport_options or {}).get("global_keyprefix", "")
        fast_queue = _fast_queue(celery_app)
        return cls(
            celery_app=celery_app,
            meta_prefix=backend_prefix,
            record_prefix=f"{global_prefix}async-task-middleware-".encode(),
            expires=expires_seconds(celery_app),
            fast_queue=fast_queue,
            messages=None
            if fast_queue is None
            else MessageTemplates(celery_app, TASK_NAME, fast_queue),
        )

    @staticmethod
    def is_redis_broker(celery_app: Celery) -> bool:
        return broker_deployment(celery_app) is not None

    def meta_key(self, task_id: str) -> bytes:
        return self.meta_prefix + task_id.encode()

    def record_key(self, task_id: str) -> bytes:
        return self.record_prefix + task_id.encode()

    def attempts_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"attempts-" + task_id.encode()

    def result_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"result-" + task_id.encode()

    def body_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"body-" + task_id.encode()

    def events_channel(self, task_id: str) -> bytes:
        return self.record_prefix + b"events-" + task_id.encode()

    def heartbeat_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"live-" + task_id.encode()

    def head_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"head-" + task_id.encode()

    def stream_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"stream-" + task_id.encode()

    def tombstone_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"refused-" + task_id.encode()

    def retry_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"retry-" + task_id.encode()

    def webhook_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"webhook-" + task_id.encode()

    def message_key(self, task_id: str) -> bytes:
        return self.record_prefix + b"message-" + task_id.encode()

    def collection_key(self, owner: str) -> bytes:
        return self.record_prefix + b"tasks-" + owner.encode()

    def owner_set_key(self, owner: str | None) -> bytes:
        return self.record_prefix + b"owner-" + (owner or "").encode()

    def idempotency_key(self, app: str, owner: str | None, key: bytes) -> bytes:
        # Scoped to the app and the owner: one client's key never names another's task.
        digest = hashlib.sha256(key).hexdigest()
        return self.record_prefix + f"idempotency-{app} {owner or '-'} {digest}".encode()

    def queued_set_key(self, app: str, route: str) -> bytes:
        return self.record_prefix + b"queued-" + f"{app} {route}".encode()


def _fast_queue(celery_app: Celery) -> str | None:
    """The queue to push to natively, or None when a setting needs Celery's own publish path.

    The native push shares one Redis script with the submission record, so it is only taken when
    the broker is that very Redis deployment (``_shared.deployment``: the same servers, database and
    Sentinel service, however the URLs are spelled) and nothing Celery would do on publish is
    lost: no key prefix, no priority, a plain queue from the router.
    """
    conf = celery_app.conf
    if broker_deployment(celery_app) != backend_deployment(celery_app):
        return None
    if (conf.broker_transport_options or {}).get("global_keyprefix"):
        return None
    if conf.task_default_priority:
        return None
    route = celery_app.amqp.router.route({}, TASK_NAME, args=(), kwargs={})
    queue = route.get("queue")
    if queue is None or route.get("priority") or route.get("exchange"):
        return None
    exchange = queue.exchange
    if exchange is not None and exchange.name and exchange.type != "direct":
        return None
    name: str = queue.name
    return name
