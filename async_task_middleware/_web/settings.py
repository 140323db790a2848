"""The middleware's options, checked once for type and range, and the per-request policy
questions they answer (who is asking, may they)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._shared.binding import ConfigurationError
from .._shared.policy import CREDENTIAL_HEADERS, Keys, Owner, SecretKey
from .._shared.routes import Route
from .._shared.webhooks import Webhooks

_MiB = 1024 * 1024


def positive_int(option: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # bool is an int to Python, never a count to a user.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{option}={value!r}: it must be a whole number of at least 1")
    return value


def positive_number(option: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigurationError(f"{option}={value!r}: it must be a number greater than 0")
    return float(value)


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    max_body_size: int
    body_timeout: float
    publish_timeout: float
    read_timeout: float
    retry_after: int
    max_connections: int
    debug: bool
    owner: Owner | None
    keys: Keys | None
    credential_headers: frozenset[bytes]
    max_tasks_per_owner: int | None
    max_queued_per_route: int | None
    max_wait: float
    submit_status: int
    location_base: str | None
    replicas: int | None
    webhooks: Webhooks | None = None
    tasks_path: str | None = None

    @classmethod
    def check(
        cls,
        *,
        name: Any,
        max_body_size: Any,
        body_timeout: Any,
        publish_timeout: Any,
        read_timeout: Any,
        retry_after: Any,
        max_connections: Any,
        debug: Any,
        owner: Any,
        secret_key: SecretKey | None,
        credential_headers: Iterable[str],
        max_tasks_per_owner: Any,
        max_queued_per_route: Any,
        max_wait: Any,
        submit_status: Any,
        location_base: Any,
        replicas: Any = None,
        webhooks: Any = None,
        tasks_path: Any = None,
    ) -> Settings:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name={name!r}: it must be a non-empty string")
        if not isinstance(debug, bool):
            raise ConfigurationError(f"debug={debug!r}: it must be True or False")
        if owner is not None and not callable(owner):
            raise ConfigurationError(f"owner={owner!r}: it must be a function of the scope")
        if isinstance(credential_headers, str):
            raise ConfigurationError("credential_headers= takes a list of header names")
        try:
            keys = Keys(secret_key) if secret_key is not None else None
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if owner is not None and keys is None:
            raise ConfigurationError(
                "owner= needs secret_key=: identities are stored only as keyed hashes"
            )
        if submit_status not in (202, 303) or isinstance(submit_status, bool):
            raise ConfigurationError(f"submit_status={submit_status!r}: it must be 303 or 202")
        if location_base is not None and location_base != "request":
            if not isinstance(location_base, str) or not re.fullmatch(
                r"https?://[A-Za-z0-9.:\[\]-]+(/[!-~]*)?", location_base
            ):
                raise ConfigurationError(
                    f"location_base={location_base!r}: None, 'request', or a base URL such as "
                    "'https://api.example.com'"
                )
            location_base = location_base.rstrip("/")
        if webhooks is not None and not isinstance(webhooks, Webhooks):
            raise ConfigurationError(f"webhooks={webhooks!r}: it must be a Webhooks(...)")
        if tasks_path is not None:
            if not isinstance(tasks_path, str) or not re.fullmatch(r"(/[\w.~-]+)+", tasks_path):
                raise ConfigurationError(f"tasks_path={tasks_path!r}: a path such as '/tasks'")
            if owner is None:
                raise ConfigurationError("tasks_path= needs owner=: only owners' tasks are listed")
        if max_tasks_per_owner is not None and owner is None:
            raise ConfigurationError("max_tasks_per_owner= needs owner= to tell owners apart")
        return cls(
            name=name,
            max_body_size=positive_int("max_body_size", max_body_size) or 0,
            body_timeout=positive_number("body_timeout", body_timeout),
            publish_timeout=positive_number("publish_timeout", publish_timeout),
            read_timeout=positive_number("read_timeout", read_timeout),
            retry_after=positive_int("retry_after", retry_after) or 1,
            max_connections=positive_int("max_connections", max_connections) or 0,
            debug=debug,
            owner=owner,
            keys=keys,
            credential_headers=CREDENTIAL_HEADERS
            | {h.lower().encode("latin-1") for h in credential_headers},
            max_tasks_per_owner=positive_int(
                "max_tasks_per_owner", max_tasks_per_owner, optional=True
            ),
            replicas=positive_int("replicas", replicas, optional=True),
            max_queued_per_route=positive_int(
                "max_queued_per_route", max_queued_per_route, optional=True
            ),
            max_wait=positive_number("max_wait", max_wait),
            submit_status=submit_status,
            location_base=location_base,
            webhooks=webhooks,
            tasks_path=tasks_path,
        )

    def owner_tags(self, scope: Mapping[str, Any]) -> tuple[str, ...]:
        """The requester's owner hashes (newest key first); empty when anonymous or when
        ownership is off."""
        if self.owner is None or self.keys is None:
            return ()
        identity = self.owner(scope)
        if identity is None:
            return ()
        return self.keys.owner_tags(identity.encode() if isinstance(identity, str) else identity)


def location(
    settings: Settings, scope: Mapping[str, Any], path: str, base: str | None = None
) -> bytes:
    """The ``Location`` (and ``Content-Location``) of a status URL: the path, or absolute on
    ``location_base`` (a fixed base, or ``"request"``: the request's own scheme and host);
    ``base`` in its place when given."""
    base = base or settings.location_base
    if base is None:
        return path.encode()
    if base == "request":
        base = f"{scope.get('scheme', 'http')}://{_host(scope)}"
    return (base + path).encode()


# A Host header is the client's text: only a plain host[:port] goes into a Location.
_HOST = re.compile(rb"[A-Za-z0-9.-]{1,253}(:\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:\d{1,5})?")


def _host(scope: Mapping[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"host" and _HOST.fullmatch(value):
            return str(value.decode("ascii"))
    server = scope.get("server")
    if server and server[1] is not None:
        return f"{server[0]}:{server[1]}"
    return str(server[0]) if server else "localhost"


async def authorized(route: Route, scope: Mapping[str, Any]) -> bool:
    """The route's ``authorize`` hook, sync or async; True without one."""
    if route.authorize is None:
        return True
    verdict = route.authorize(scope)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict is True
