"""Which requests the middleware owns: marked routes and the status URLs below them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.routing import compile_path

# Task ids are random UUID4s in canonical form; anything else is a 404 without a backend call.
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

STATUS_METHODS = ("GET", "HEAD", "DELETE")
_NAMED_GROUP = re.compile(r"\(\?P<\w+>")


@dataclass(frozen=True, slots=True)
class Submit:
    """A request to a marked route; ``location`` is the status URL's prefix."""

    location: str


@dataclass(frozen=True, slots=True)
class Status:
    """A request to a status URL; ``task_id`` is None when it is not of the task-id form."""

    task_id: str | None
    location: str


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


class RouteTable:
    """The marked routes, matched against the path with ``root_path`` stripped."""

    def __init__(self, specs: Iterable[str]) -> None:
        if isinstance(specs, str):
            raise TypeError("routes= takes a list of 'METHOD /path' strings, not one string")
        self._routes = [parse_route(spec) for spec in specs]
        if not self._routes:
            raise ValueError("routes= is empty: name at least one route, e.g. ['POST /words']")
        # Every request passes here: one regex over all marked paths and the status URLs below
        # them lets the many requests the middleware does not own through at once.
        bodies = (_NAMED_GROUP.sub("(?:", regex.pattern)[1:-1] for _, regex in self._routes)
        self._owned = re.compile(f"^(?:{'|'.join(bodies)})(?:/[^/]*)?$")

    def match(self, scope: Mapping[str, Any]) -> Submit | Status | None:
        path = route_path(scope)
        if self._owned.match(path) is None:
            return None
        method: str = scope["method"]
        for route_method, regex in self._routes:
            if method == route_method and regex.match(path):
                return Submit(_location(scope, path))
        prefix, _, last = path.rpartition("/")
        if not prefix or not last:
            return None  # '/words/' is the app's (Starlette redirects it), not a status URL
        for _, regex in self._routes:
            if regex.match(prefix):
                task_id = last if _TASK_ID.fullmatch(last) else None
                return Status(task_id, _location(scope, prefix))
        return None


def _location(scope: Mapping[str, Any], path: str) -> str:
    # Built from root_path and the matched path, percent-encoded; a leading '//' would make a
    # protocol-relative URL pointing at another host, so it is folded to one slash.
    full = scope.get("root_path", "") + path
    return "/" + quote(full.lstrip("/"), safe="/:@!$&'()*+,;=-._~")
