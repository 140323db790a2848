"""A submission's body: read whole within its limit, and its fingerprint for idempotency."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .._shared.types import Receive, Scope


class BodyTooLarge(Exception):
    pass


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            # Digits only (RFC 9110): int() would also take '+5', ' 5' and '1_0'.
            if not value.isdigit():
                raise ValueError(value)
            return int(value)
    return None


async def read_body(receive: Receive, limit: int) -> bytearray | None:
    """The whole body, or None when the client disconnected first."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return body


def fingerprint(scope: Scope, body: bytearray) -> str:
    """What makes two requests "the same" for an idempotency key: method, path, query and the
    body (the owner is in the key's own name). A ``multipart/form-data`` body counts by its
    parts, not its boundary: a client that builds the form again for its retry picks a new
    boundary, and that retry is the same request. Any other body counts by its bytes."""
    digest = hashlib.sha256()
    for part in (scope["method"].encode(), scope.get("raw_path") or scope["path"].encode()):
        digest.update(part + b"\0")
    digest.update(scope.get("query_string", b"") + b"\0")
    boundary = multipart_boundary(scope.get("headers", ()))
    if boundary is None:
        digest.update(body)
        return digest.hexdigest()
    # The parts between the delimiters, each behind its length, so that no two different
    # sequences of parts hash alike; hashed from a view, without copying the body.
    digest.update(b"multipart/form-data\0")
    view, delimiter, start = memoryview(body), b"--" + boundary, 0
    while True:
        end = body.find(delimiter, start)
        piece = view[start:] if end < 0 else view[start:end]
        digest.update(b"%d:" % len(piece))
        digest.update(piece)
        if end < 0:
            return digest.hexdigest()
        start = end + len(delimiter)


# RFC 2046 5.1.1: 1 to 70 of these, the last not a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def multipart_boundary(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The boundary of a ``multipart/form-data`` request, None for any other (or a malformed
    or repeated content type, whose body then counts by its bytes)."""
    values = [value for name, value in headers if name == b"content-type"]
    if len(values) != 1:
        return None
    media, *params = values[0].split(b";")
    if media.strip().lower() != b"multipart/form-data":
        return None
    found = None
    for param in params:
        name, sep, value = param.partition(b"=")
        if sep and name.strip().lower() == b"boundary":
            if found is not None:
                return None
            value = value.strip()
            if len(value) >= 2 and value[:1] == value[-1:] == b'"':
                value = value[1:-1]
            found = value
    return found if found is not None and _BOUNDARY.fullmatch(found) else None
