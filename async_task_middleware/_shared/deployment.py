"""Which Redis the broker and the result backend are, read from Celery's and kombu's own parsing.

The web side connects to the result backend's Redis with the settings Celery parsed for it
(``backend.connparams``: host or Sentinel hosts, database, user, password, TLS options), so
that every form Celery documents (``rediss://…?ssl_cert_reqs=required``,
``redis_backend_use_ssl``, ``sentinel://a;sentinel://b`` with ``master_name``) means here what
it means in the worker. Two settings name the same deployment when they name the same
servers, database and Sentinel service, however their URLs are spelled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio
from celery import Celery
from celery.backends.redis import RedisBackend
from kombu.utils.url import url_to_parts
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import NoScriptError

from .errors import ConfigurationError

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: How long the worker keeps trying a Redis call through a restart or a failover (Sentinel
#: promotes a replica within ``down-after-milliseconds`` plus its election, seconds).
FAILOVER_BUDGET = 60.0

_DEFAULT_PORTS = {"sentinel": 26379}
_BROKER_SCHEMES = frozenset({"redis", "rediss", "sentinel", "redis+socket", "socket"})
# The synchronous connection classes Celery picks, and their asyncio twins.
_ASYNC_CLASSES: dict[type[Any] | None, type[redis.asyncio.Connection]] = {
    None: redis.asyncio.Connection,
    redis.Connection: redis.asyncio.Connection,
    redis.SSLConnection: redis.asyncio.SSLConnection,
    redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,  # type: ignore[dict-item]
}
# Settings of Celery's own pool that the web side sets for itself: its deadlines, its pool size.
_OWN = ("max_connections", "socket_timeout", "socket_connect_timeout", "retry_on_timeout")


@dataclass(frozen=True, slots=True)
class Deployment:
    """One Redis deployment: its servers (the sentinels, for Sentinel), database and service."""

    servers: frozenset[str]
    db: int
    service: str | None = None


def is_redis_backend(celery_app: Celery) -> bool:
    return isinstance(celery_app.backend, RedisBackend)


def backend_deployment(celery_app: Celery) -> Deployment:
    params = celery_app.backend.connparams
    hosts = params.get("hosts")
    if hosts is not None:
        options = celery_app.conf.result_backend_transport_options or {}
        servers = frozenset(_server(h["host"], h["port"]) for h in hosts)
        return Deployment(servers, _db(params.get("db")), options.get("master_name"))
    server = params["path"] if "path" in params else _server(params["host"], params["port"])
    return Deployment(frozenset([server]), _db(params.get("db")))


def broker_deployment(celery_app: Celery) -> Deployment | None:
    """The Redis broker's deployment, or None for any other broker."""
    url = celery_app.conf.broker_url
    if not isinstance(url, str):
        return None
    servers: set[str] = set()
    db = 0
    scheme = ""
    for chunk in url.split(";"):
        parts = url_to_parts(chunk)
        scheme = parts.scheme
        if scheme not in _BROKER_SCHEMES:
            return None
        if scheme.endswith("socket"):
            servers.add("/" + (parts.path or ""))
            db = _db(parts.query.get("virtual_host"))
        else:
            servers.add(_server(parts.hostname, parts.port or _DEFAULT_PORTS.get(scheme, 6379)))
            db = _db(parts.path)
    options = celery_app.conf.broker_transport_options or {}
    service = options.get("master_name") if scheme == "sentinel" else None
    return Deployment(frozenset(servers), db, service)


def _server(host: str | None, port: int) -> str:
    return f"{'127.0.0.1' if host in (None, '', 'localhost') else host}:{port}"


def _db(value: Any) -> int:
    text = str(value or "").strip("/")
    return int(text) if text.isdigit() else 0


class _BlockingSentinelPool(redis.asyncio.BlockingConnectionPool, SentinelConnectionPool):
    """Sentinel's master discovery with the blocking pool's bounded wait for a connection."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # closing for good, not re-pointing at a new master
            await self.sentinel_manager.aclose()


def backend_pool(
    celery_app: Celery, *, max_connections: int, timeout: float, client_name: str
) -> redis.asyncio.ConnectionPool:
    """An asyncio pool to the result backend's Redis, as Celery parsed its settings, with this
    side's own deadline on every socket operation and on the wait for a free connection."""
    params = dict(celery_app.backend.connparams)
    for name in _OWN:
        params.pop(name, None)
    hosts = params.pop("hosts", None)
    sync_class = params.pop("connection_class", None)
    common = {
        **params,
        "max_connections": max_connections,
        "timeout": timeout,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # Named, so that an operator's CLIENT LIST tells the web side's connections apart.
        "client_name": client_name,
    }
    if hosts is not None:
        options = celery_app.conf.result_backend_transport_options or {}
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            [(h["host"], h["port"]) for h in hosts],
            min_other_sentinels=options.get("min_other_sentinels", 0),
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                **options.get("sentinel_kwargs", {}),
            },
        )
        tls = sync_class is not None and issubclass(sync_class, redis.SSLConnection)
        pool: redis.asyncio.ConnectionPool = _BlockingSentinelPool(
            service_name=options.get("master_name"),
            sentinel_manager=sentinel,
            connection_class=SentinelManagedSSLConnection if tls else SentinelManagedConnection,
            **common,
        )
        return pool
    connection_class = _ASYNC_CLASSES.get(sync_class)
    if connection_class is None:
        raise ConfigurationError(
            f"the result backend's connection class {sync_class!r} has no asyncio twin known "
            "to async-task-middleware; use a redis://, rediss://, sentinel:// or socket URL"
        )
    return redis.asyncio.BlockingConnectionPool(connection_class=connection_class, **common)


CLUSTER_REFUSED = (
    "the result backend's Redis runs in cluster mode: Celery's Redis broker and result "
    "backend do not work on a Redis Cluster (MOVED errors), nor do the middleware's "
    "multi-key scripts. Use one Redis, or a highly available one behind Sentinel "
    "(sentinel:// URLs with master_name)."
)


def is_cluster(info: dict[str, Any]) -> bool:
    """From ``INFO cluster``: whether this Redis is a cluster node."""
    return str(info.get("cluster_enabled", 0)) == "1"


def again(call: Callable[[], T], what: str) -> T:
    """The worker's own Redis calls (blocking, on its task's thread), tried again while the
    connection fails or times out, for up to ``FAILOVER_BUDGET``: a finished replay must not
    fail because the master changed under it. Also while Redis answers NOSCRIPT: a script
    call loads its script again when Redis has lost it (restarted, failed over), and answers
    NOSCRIPT only if Redis lost it once more between that load and the call, which the next
    try loads again. Every call made this way is idempotent."""
    deadline = time.monotonic() + FAILOVER_BUDGET
    delay = 0.05
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, NoScriptError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: %s; trying again", what, type(exc).__name__)
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
