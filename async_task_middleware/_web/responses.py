"""The middleware's own answers: small JSON and problem-details (RFC 9457) responses."""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: The prefix of every problem ``type`` (a URN: stable, and naming no host).
TYPE_PREFIX = "urn:async-task-middleware:problem:"


class Problem(enum.Enum):
    """Every error the middleware answers itself: a stable ``type`` per kind (RFC 9457), so a
    client can tell them apart without parsing titles. docs/protocol.md lists them with
    examples."""

    BAD_REQUEST = (400, "bad-request", "Bad Request")
    BAD_IDEMPOTENCY_KEY = (400, "bad-idempotency-key", "Malformed Idempotency-Key")
    BAD_WEBHOOK = (400, "bad-webhook", "Webhook refused")
    UNAUTHORIZED = (401, "unauthorized", "Unauthorized")
    NOT_FOUND = (404, "not-found", "Not Found")
    METHOD_NOT_ALLOWED = (405, "method-not-allowed", "Method Not Allowed")
    BODY_TIMEOUT = (408, "body-timeout", "Request Timeout")
    TOO_LARGE = (413, "too-large", "Content Too Large")
    IDEMPOTENCY_CONFLICT = (422, "idempotency-conflict", "Idempotency-Key reused")
    RANGE_NOT_SATISFIABLE = (416, "range-not-satisfiable", "Range Not Satisfiable")
    TOO_MANY_TASKS = (429, "too-many-tasks", "Too Many Unfinished Tasks")
    FAILED = (500, "task-failed", "Task failed")
    QUEUE_FULL = (503, "queue-full", "Task queue full")
    UNAVAILABLE = (503, "unavailable", "Service Unavailable")

    def __init__(self, status: int, kind: str, title: str) -> None:
        self.status = status
        self.type = TYPE_PREFIX + kind
        self.title = title


async def send_response(
    send: Send,
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    head: bool = False,
) -> None:
    """Send a whole response; for HEAD the same headers and no body."""
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def send_json(
    send: Send,
    status: int,
    content: dict[str, Any],
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    content_type: bytes = b"application/json",
    head: bool = False,
) -> None:
    body = json.dumps(content, separators=(",", ":")).encode()
    all_headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send_response(send, status, all_headers, body, head=head)


async def send_problem(
    send: Send,
    problem: Problem,
    instance: str,
    *,
    detail: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    head: bool = False,
) -> None:
    content: dict[str, Any] = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "instance": instance,
    }
    if detail is not None:
        content["detail"] = detail
    await send_json(
        send,
        problem.status,
        content,
        [(b"cache-control", b"no-store"), *headers],
        content_type=b"application/problem+json",
        head=head,
    )
