"""The middleware's own answers: small JSON and problem-details (RFC 9457) responses."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Task failed",
    503: "Service Unavailable",
}


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
    status: int,
    instance: str,
    *,
    detail: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    head: bool = False,
) -> None:
    problem: dict[str, Any] = {
        "type": "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "instance": instance,
    }
    if detail is not None:
        problem["detail"] = detail
    await send_json(
        send,
        status,
        problem,
        [(b"cache-control", b"no-store"), *headers],
        content_type=b"application/problem+json",
        head=head,
    )
