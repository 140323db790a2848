"""The web side: answer marked routes with 303, serve the status URLs, pass everything else."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable, Mapping

from celery import Celery

from .._shared import metrics as _metrics
from .._shared.binding import Binding, ConfigurationError, survive_failover
from .._shared.deployment import CLUSTER_REFUSED
from .._shared.policy import Owner, SecretKey
from .._shared.retry import schedule_fits
from .._shared.routes import Authorize, Route, RouteTable, Submit
from .._shared.types import (
    REPLAY_KEY,
    WRAPPED_APPS,
    ASGIApp,
    Message,
    Receive,
    ReplayMark,
    Scope,
    Send,
)
from .._shared.webhooks import Webhooks
from .collection import collection
from .settings import Settings
from .status import status
from .store import TaskStore
from .submit import submit

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024


class AsyncTaskMiddleware:
    """Runs the marked routes of an ASGI app as Celery tasks, behind the 303 / 202 / 200 protocol.

    A request to a marked route is answered at once with ``303 See Other`` and a ``Location``
    (the request path + ``/{task_id}``); a Celery worker later replays the very same request
    against the very same app (see ``register_replay``) and the status URL serves the outcome.
    Place it *inside* the app's own authentication, CORS and rate limiting (for Starlette and
    FastAPI: add it first), so that they see submissions and status URLs alike. Every option is
    keyword-only and checked when the middleware is built, for type as well as range
    (``ConfigurationError``). The task store is always the Celery result backend's Redis, where
    the worker looks too.

    Args:
        app: The ASGI app whose routes are marked.
        celery_app: The Celery app; its ``result_backend`` must be Redis.
        routes: ``["POST /words", "PUT /reports/{id:int}"]``, in Starlette's path syntax
            (``{id:int}``, ``{rest:path}``), matched below ``root_path`` so that the middleware
            works inside mounts; or a mapping from each to its ``Route(...)`` settings.
        name: The key under which the worker knows this app (``register_replay``).
        authorize: ``authorize(scope) -> bool``, sync or async, run before anything is
            enqueued and on every status request of every route without its own; ``False`` is
            a 401.
        owner: ``owner(scope) -> str | bytes | None``, the identity a task belongs to (``None``:
            anonymous); ``header_owner("authorization")`` and ``header_owner(cookies=["session"])``
            are ready-made. They hash the credential itself: where tokens rotate (short-lived
            JWTs), return a stable user id from a verified token instead, or a refreshed token
            loses its tasks. Needs ``secret_key``.
        secret_key: At least 16 bytes; signs owner identities (HMAC-SHA256) and encrypts
            credential headers at rest (Fernet). A list rotates keys: the first writes, all
            read. The worker needs the same.
        credential_headers: Headers to protect beside ``authorization``, ``cookie`` and
            ``proxy-authorization``: encrypted with ``secret_key``, dropped without one (with a
            warning, once).
        max_tasks_per_owner: Unfinished tasks one owner may have; more is ``429`` with
            ``Retry-After``. Anonymous requests have no owner cap: bound them with the next.
        max_queued_per_route: Tasks of a route waiting for a worker; more is ``503`` with
            ``Retry-After``.
        max_wait: The longest ``Prefer: wait`` honoured, in seconds.
        submit_status: ``303`` (See Other) or ``202`` (Accepted, with ``Location`` and
            ``Retry-After``: the shape of long-running-operation pollers that follow
            ``Location`` while 202).
        location_base: ``None``: a relative ``Location``; ``"request"``: the request's scheme
            and host (as the server and its proxy-headers handling present them; a malformed
            ``Host`` falls back to the server's address); or a fixed public base URL such as
            ``"https://api.example.com"``.
        max_body_size: Bytes; a larger body is ``413`` and nothing is enqueued, decided from
            ``Content-Length`` before reading when present.
        body_timeout: Seconds the whole body may take to arrive; a client that trickles it
            gets ``408`` and the connection is closed.
        publish_timeout: Seconds the whole submission may take, settling included: one that
            cannot be taken in time is ``503`` with ``Retry-After``, and never runs.
        read_timeout: Seconds a status read or delete may take before it is ``503`` with
            ``Retry-After``.
        retry_after: Whole seconds, the base ``Retry-After`` of 202, 429 and 503 answers (older
            tasks get longer).
        max_connections: Redis connections per event loop for what does not share the one
            pipelined connection of the status reads and small submissions (``_web.lane``):
            large submissions, deletes, long polls, large result bodies; callers wait for a
            free one, within their deadline.
        replicas: With a replicated Redis (Sentinel), a 303 only once this many replicas have
            the task too (Redis's ``WAIT``, within ``publish_timeout``; fewer is ``503`` and the
            task is taken back): a master that dies right after the 303 then loses nothing. It
            costs the replication round trip on every submission. ``None``: the master's word
            is enough.
        webhooks: Where a submission's ``Webhook-URL`` may point (``Webhooks(allow=...)``);
            ``None``: webhooks are off, and a submission that asks for one is a 400.
        tasks_path: Where the owner's collection is served (``"/tasks"``): ``GET`` lists the
            caller's own tasks, newest first, a page at a time (docs/protocol.md). Needs
            ``owner``; ``None``: no collection.
        debug: Put the exception type and message of a failed task in its 500.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        celery_app: Celery,
        routes: Iterable[str] | Mapping[str, Route],
        name: str = "default",
        authorize: Authorize | None = None,
        owner: Owner | None = None,
        secret_key: SecretKey | None = None,
        credential_headers: Iterable[str] = (),
        max_tasks_per_owner: int | None = None,
        max_queued_per_route: int | None = None,
        max_wait: float = 30.0,
        submit_status: int = 303,
        location_base: str | None = None,
        max_body_size: int = 10 * _MiB,
        body_timeout: float = 30.0,
        publish_timeout: float = 2.0,
        read_timeout: float = 2.0,
        retry_after: int = 1,
        max_connections: int = 64,
        replicas: int | None = None,
        webhooks: Webhooks | None = None,
        tasks_path: str | None = None,
        debug: bool = False,
    ) -> None:
        self.app = app
        self._settings = Settings.check(
            name=name,
            max_body_size=max_body_size,
            body_timeout=body_timeout,
            publish_timeout=publish_timeout,
            read_timeout=read_timeout,
            retry_after=retry_after,
            max_connections=max_connections,
            debug=debug,
            owner=owner,
            secret_key=secret_key,
            credential_headers=credential_headers,
            max_tasks_per_owner=max_tasks_per_owner,
            max_queued_per_route=max_queued_per_route,
            max_wait=max_wait,
            submit_status=submit_status,
            location_base=location_base,
            replicas=replicas,
            webhooks=webhooks,
            tasks_path=tasks_path,
        )
        if authorize is not None and not callable(authorize):
            raise ConfigurationError(f"authorize={authorize!r}: it must be a function of the scope")
        try:
            default = Route(authorize=authorize, retry_after=self._settings.retry_after)
            self._routes = RouteTable(routes, default)
            self._default = default
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        fixed = isinstance(routes, Mapping) and any(r.webhook for r in routes.values())
        if fixed and self._settings.webhooks is None:
            raise ConfigurationError("Route(webhook=...) needs the middleware's webhooks=")
        survive_failover(celery_app)  # before Celery's backend is built: it reads them once
        self._binding = Binding.of(celery_app)
        if isinstance(routes, Mapping):
            retried = [(r.retries, r.time_limit) for r in routes.values() if r.retries]
            too_long = schedule_fits(retried, self._binding.expires)
            if too_long is not None:
                raise ConfigurationError(too_long)
        WRAPPED_APPS[self._settings.name] = id(app)
        # Redis connections belong to the event loop that opened them; a process normally has
        # one loop, tests and embedded servers may have several.
        self._stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TaskStore] = (
            weakref.WeakKeyDictionary()
        )
        # The last loop's store, checked first: a server has one loop, and the weak mapping's
        # lookup is a measurable share of every submission's and status read's own time.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], TaskStore] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Every request of the app passes here: the common case, an HTTP request the
        # middleware does not own, takes one comparison, one lookup and one regex match.
        if scope["type"] == "http":
            if REPLAY_KEY not in scope:
                target = self._routes.match(scope)
                if target is not None:
                    args = (self._settings, self._binding, self._store(), scope, receive, send)
                    if isinstance(target, Submit):
                        if _metrics.ENABLED:
                            args = (*args[:-1], _metrics.counting(send, target.spec))
                        await submit(*args, target)
                    else:
                        await status(*args, target)
                    return
                if self._settings.tasks_path is not None and self._is_collection(scope):
                    store = self._store()
                    await collection(self._settings, self._default, store, scope, send)
                    return
            else:
                mark = scope[REPLAY_KEY]
                if isinstance(mark, ReplayMark):
                    mark.reached = True
        elif scope["type"] == "lifespan":
            send = self._lifespan_send(send)
        await self.app(scope, receive, send)

    def _is_collection(self, scope: Scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return bool(path == self._settings.tasks_path)

    def _lifespan_send(self, send: Send) -> Send:
        """The lifespan's ``send``: the app does not start on a Redis Cluster (the first request
        would fail), and this loop's Redis connections close as the app stops."""

        async def send_closing(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                if await self._store().is_cluster():
                    logger.critical("refusing to start: %s", CLUSTER_REFUSED)
                    message = {"type": "lifespan.startup.failed", "message": CLUSTER_REFUSED}
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                store = self._stores.pop(asyncio.get_running_loop(), None)
                self._last = None
                if store is not None:
                    await store.aclose()
            await send(message)

        return send_closing

    def _store(self) -> TaskStore:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        store = self._stores.get(loop)
        if store is None:
            settings = self._settings
            store = TaskStore(
                self._binding,
                timeout=settings.read_timeout,
                max_connections=settings.max_connections,
            )
            self._stores[loop] = store
        self._last = (weakref.ref(loop), store)
        return store
