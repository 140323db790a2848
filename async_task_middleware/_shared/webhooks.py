"""Completion webhooks: the operator's settings, and the event a delivery carries.

A submission that names a ``Webhook-URL`` allowed by ``Webhooks.allow`` is called back when
its task starts, reports progress or ends (``Webhook-Events``; ``completed`` by default). The
web side checks the URL and pins the address it resolved to (``_web.hooks``); the worker
signs and sends each event as a task of its own on the broker (``_worker.deliver``), retried
on the schedule, the same ``webhook-id`` on every attempt (Standard Webhooks).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError

#: The Celery task that delivers one event.
DELIVER_TASK = "async_task_middleware.webhook"
EVENTS = frozenset({"started", "progress", "completed"})
#: The schemes a webhook may use, and the port each means when the URL names none.
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Seconds before each retry after the first attempt (Standard Webhooks' schedule), each with
#: up to a fifth of it as jitter; after the last, the delivery is given up.
SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)


@dataclass(frozen=True)
class Webhooks:
    """Where completion webhooks may go, and how they are signed and sent; the same object
    (or the same settings) for the middleware and ``register_replay``.

    Args:
        allow: The rules a ``Webhook-URL`` must match, none by default (webhooks off). A rule
            with ``://`` is a URL prefix (``"https://hooks.example.com/tasks/"``); any other is
            a host pattern (``"hooks.example.com"``, ``"*.example.com"``). An address that is
            not public (loopback, private, link-local, multicast, cloud metadata) is refused
            unless a rule names its host exactly, not by a pattern.
        secret: The signing secret (``whsec_`` and base64, as Standard Webhooks gives it), or a
            list of them: every one signs, so that a receiver moves to a new one at its pace.
            Needed by the worker; the web side does not use it.
        timeout: Seconds an attempt may take, connecting and answering.
        schedule: Seconds before each retry (jittered up to a fifth); then given up.
        queue: The Celery queue of the deliveries, consumed by the replay's workers too (or
            by workers of their own, with ``-Q``), so that a slow receiver never holds a
            replay's queue.
    """

    allow: Sequence[str] = ()
    secret: str | Sequence[str] | None = None
    timeout: float = 10.0
    schedule: Sequence[float] = SCHEDULE
    queue: str = "async-task-middleware-webhooks"
    secrets: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow, str) or not all(isinstance(r, str) and r for r in self.allow):
            raise ConfigurationError("Webhooks(allow=...): a list of URL prefixes or host patterns")
        for rule in self.allow:
            if any(ord(c) < 0x21 or c == "\x7f" for c in rule):
                raise ConfigurationError(f"Webhooks(allow=...): {rule!r} has a control character")
        if not isinstance(self.timeout, int | float) or isinstance(self.timeout, bool):
            raise ConfigurationError("Webhooks(timeout=...): seconds, a number")
        if not 0 < self.timeout <= 60:
            raise ConfigurationError("Webhooks(timeout=...): between 0 and 60 seconds")
        if any(not isinstance(s, int | float) or s < 0 for s in self.schedule):
            raise ConfigurationError("Webhooks(schedule=...): seconds, none below 0")
        given = [self.secret] if isinstance(self.secret, str) else list(self.secret or ())
        object.__setattr__(self, "secrets", tuple(_decode(s) for s in given))


def _decode(secret: Any) -> bytes:
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise ConfigurationError("Webhooks(secret=...): a 'whsec_' secret, or a list of them")
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("Webhooks(secret=...): not base64 after 'whsec_'") from None
    if len(key) < 16:
        raise ConfigurationError("Webhooks(secret=...): at least 16 bytes of key")
    return key


def backoff(schedule: Sequence[float], retry: int) -> float | None:
    """Seconds before retry number ``retry`` (0 first), jittered; None: give up."""
    if retry >= len(schedule):
        return None
    base = schedule[retry]
    return base + random.uniform(0, base / 5)


def event(
    kind: str,
    hook: dict[str, Any],
    task_id: str,
    *,
    status: str,
    http_status: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """A delivery's arguments: its id (the same on every attempt), where it goes and the
    body it signs. No result body and no request data: the receiver reads the result at the
    location with its own credentials."""
    data: dict[str, Any] = {
        "task_id": task_id,
        "location": hook["location"],
        "route": hook["route"],
        "status": status,
    }
    if http_status is not None:
        data["http_status"] = http_status
    if kind == "progress":
        data["progress"] = progress
    now = datetime.datetime.now(datetime.UTC)
    body = {"type": f"task.{kind}", "timestamp": now.isoformat(), "data": data}
    return {
        "task_id": task_id,
        "kind": kind,
        "id": f"msg_{task_id}_{kind}" if kind != "progress" else f"msg_{task_id}_{now.timestamp()}",
        "url": hook["url"],
        "address": hook["address"],
        "payload": json.dumps(body, separators=(",", ":")),
    }


def publish(celery_app: Any, queue: str, sent: dict[str, Any]) -> None:
    """Publish one event's delivery through Celery (blocking: a thread's call)."""
    celery_app.send_task(
        DELIVER_TASK,
        args=(sent,),
        queue=queue,
        argsrepr=repr((sent["id"],)),  # what Flower shows: never the URL
        ignore_result=True,
    )


def wants(hook: dict[str, Any] | None, kind: str) -> bool:
    return hook is not None and kind in hook.get("events", ())


def parse_events(values: Iterable[str]) -> frozenset[str] | None:
    """The events a ``Webhook-Events`` header names; None when it names an unknown one."""
    named = frozenset(v.strip().lower() for value in values for v in value.split(","))
    named -= {""}
    return named if named and named <= EVENTS else None
