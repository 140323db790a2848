"""Which requests the middleware owns: marked routes and the status URLs below them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.routing import compile_path

from .retry import Retry
from .webhooks import parse_events

# Task ids are random UUID4s in canonical form; anything else is a 404 without a backend call.
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

STATUS_METHODS = ("GET", "HEAD", "DELETE")
_NAMED_GROUP = re.compile(r"\(\?P<\w+>")
# What a Location keeps as it is; anything else is percent-encoded.
_SAFE = "/:@!$&'()*+,;=-._~"
_URL_SAFE = re.compile("[A-Za-z0-9" + re.escape(_SAFE) + "]*")


#: ``authorize(scope)``: True lets the request on; False answers 401. Sync or async.
Authorize = Callable[[Mapping[str, Any]], "bool | Awaitable[bool]"]


@dataclass(frozen=True, slots=True)
class Route:
    """Settings of one marked route, e.g. ``routes={"POST /words": Route(wait=5),
    "POST /reports": Route(queue="reports", time_limit=600, retry_after=10)}``.

    Args:
        authorize: Runs on the web side before anything is enqueued and on every request to
            the route's status URLs; for apps whose authentication lives in endpoint
            dependencies or Litestar guards, which only run in the worker. ``None``: the
            middleware's own ``authorize``, if any.
        wait: Seconds a submission waits for its task to finish before the 303, as if the
            client had sent ``Prefer: wait=N`` (a client's own ``Prefer`` wins). ``None``: no
            wait.
        queue: The Celery queue the task goes to (start a worker for it with ``-Q <queue>``).
            ``None``: the task's default route.
        time_limit: Seconds the replay may run, carried in the message, so that one worker
            serves routes with different limits. ``None``: the worker's ``time_limit``.
        retry_after: The base ``Retry-After`` of this route's 202s. ``None``: the middleware's.
        webhook: A ``Webhook-URL`` of the route's own, for callers that cannot send the header
            (theirs wins when they do); checked like theirs, against the middleware's
            ``webhooks`` rules, at each submission. ``None``: none.
        webhook_events: The events of the route's ``webhook``, as ``Webhook-Events`` names
            them.
        retries: The route's ``Retry(...)`` policy for transient failures. ``None``: a
            failure is the task's outcome at once.
        max_response_size: Bytes the route's response may have, carried in the message (a
            streamed export may need more than the worker's ``max_response_size``, which
            ``None`` keeps); a larger one fails the task, a streamed one as it passes it.
    """

    authorize: Authorize | None = None
    wait: float | None = None
    queue: str | None = None
    time_limit: float | None = None
    retry_after: int | None = None
    webhook: str | None = None
    webhook_events: str = "completed"
    retries: Retry | None = None
    max_response_size: int | None = None

    def __post_init__(self) -> None:
        if self.authorize is not None and not callable(self.authorize):
            raise TypeError(f"Route(authorize={self.authorize!r}): it must be a function")
        for name in ("wait", "time_limit"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int | float) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(f"Route({name}={value!r}): it must be a number above 0")
        if self.retry_after is not None and (
            not isinstance(self.retry_after, int)
            or isinstance(self.retry_after, bool)
            or self.retry_after < 1
        ):
            raise ValueError(f"Route(retry_after={self.retry_after!r}): a whole number >= 1")
        if self.queue is not None and (
            not isinstance(self.queue, str) or not re.fullmatch(r"[\w.:-]{1,200}", self.queue)
        ):
            raise ValueError(f"Route(queue={self.queue!r}): letters, digits and _ . : - only")
        if self.webhook is not None and (
            not isinstance(self.webhook, str)
            or not re.fullmatch(r"https?://[!-~]{1,2040}", self.webhook)
        ):
            raise ValueError("Route(webhook=...): an http(s) URL of printable ASCII")
        size = self.max_response_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"Route(max_response_size={size!r}): a whole number of bytes >= 1")
        if self.retries is not None and not isinstance(self.retries, Retry):
            raise ValueError(f"Route(retries={self.retries!r}): a Retry(...)")
        if not isinstance(self.webhook_events, str) or parse_events([self.webhook_events]) is None:
            raise ValueError("Route(webhook_events=...): e.g. 'started, completed'")


@dataclass(frozen=True, slots=True)
class Submit:
    """A request to a marked route; ``location`` is the status URL's prefix."""

    location: str
    spec: str = ""
    route: Route = field(default=Route(), compare=False)


@dataclass(frozen=True, slots=True)
class Status:
    """A request to a status URL; ``task_id`` is None when it is not of the task-id form.

    ``instance`` is the requested path as the client sent it (percent-encoded): the same for a
    malformed id as for an unknown one, so that neither 404 tells them apart.
    """

    task_id: str | None
    location: str
    instance: str = ""
    route: Route = field(default=Route(), compare=False)


def route_path(scope: Mapping[str, Any]) -> str:
    """The path below ``root_path``, the way Starlette's router sees it (mounts included)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    # '/api/words' below root_path '/api' is '/words'; '/apiary' is not below it.
    if root_path and path.startswith(root_path) and path[len(root_path) :][:1] in ("/", ""):
        return path[len(root_path) :] or "/"
    return path


def parse_route(spec: str) -> tuple[str, re.Pattern[str]]:
    """``"POST /words"`` -> ``("POST", regex)``, in Starlette's path syntax."""
    method, sep, path = spec.strip().partition(" ")
    path = path.strip()
    if not sep or not method.isalpha() or not path.startswith("/"):
        raise ValueError(f"route {spec!r} is not of the form 'METHOD /path', e.g. 'POST /words'")
    if path != "/" and path.endswith("/"):
        raise ValueError(f"route {spec!r}: drop the trailing slash")
    regex, _, _ = compile_path(path)
    return method.upper(), regex


def _specs(routes: Iterable[str] | Mapping[str, Route]) -> list[tuple[str, Route]]:
    if isinstance(routes, str):
        raise TypeError("routes= takes a list of 'METHOD /path' strings, not one string")
    if isinstance(routes, Mapping):
        pairs = list(routes.items())
    else:
        pairs = [(spec, Route()) for spec in routes]
    for spec, route in pairs:
        if not isinstance(spec, str):
            raise TypeError(f"routes=: {spec!r} is not a 'METHOD /path' string")
        if not isinstance(route, Route):
            raise TypeError(f"routes=: the settings of {spec!r} are not a Route(...)")
    return pairs


class RouteTable:
    """The marked routes, matched against the path with ``root_path`` stripped.

    Matching is ``fullmatch``: Starlette's patterns end in ``$``, which in Python also matches
    before a final newline, so ``POST /words%0a`` would otherwise be taken for ``POST /words``
    and given a status URL that leads nowhere.
    """

    def __init__(
        self, routes: Iterable[str] | Mapping[str, Route], default: Route | None = None
    ) -> None:
        self._routes = [
            (*parse_route(spec), " ".join(spec.split()), _with_default(route, default))
            for spec, route in _specs(routes)
        ]
        if not self._routes:
            raise ValueError("routes= is empty: name at least one route, e.g. ['POST /words']")
        # Every request passes here: one regex over all marked paths and the status URLs below
        # them lets the many requests the middleware does not own through at once.
        bodies = (_NAMED_GROUP.sub("(?:", regex.pattern)[1:-1] for _, regex, _, _ in self._routes)
        self._owned = re.compile(f"(?:{'|'.join(bodies)})(?:/[^/]*)?")

    def match(self, scope: Mapping[str, Any]) -> Submit | Status | None:
        path = route_path(scope)
        if self._owned.fullmatch(path) is None:
            return None
        method: str = scope["method"]
        for route_method, regex, spec, route in self._routes:
            if method == route_method and regex.fullmatch(path):
                return Submit(_location(scope, path), spec, route)
        prefix, _, last = path.rpartition("/")
        if not prefix or not last:
            return None  # '/words/' is the app's (Starlette redirects it), not a status URL
        for _, regex, _, route in self._routes:
            if regex.fullmatch(prefix):
                task_id = last if _TASK_ID.fullmatch(last) else None
                return Status(task_id, _location(scope, prefix), _location(scope, path), route)
        return None


def _with_default(route: Route, default: Route | None) -> Route:
    """The route's settings, the middleware's where the route sets none."""
    if default is None:
        return route
    changes = {
        name: getattr(default, name)
        for name in ("authorize", "retry_after")
        if getattr(route, name) is None
    }
    return dataclasses.replace(route, **changes)


def _location(scope: Mapping[str, Any], path: str) -> str:
    # Built from root_path and the matched path, percent-encoded; a leading '//' would make a
    # protocol-relative URL pointing at another host, so it is folded to one slash.
    full: str = scope.get("root_path", "") + path
    if _URL_SAFE.fullmatch(full):  # the common case: nothing to encode (quote is slow)
        return "/" + full.lstrip("/")
    return "/" + quote(full.lstrip("/"), safe=_SAFE)
