"""The JSON envelopes that cross the broker and the result backend.

Only JSON crosses: bodies are base64, headers are ``[name, value]`` pairs of latin-1 strings in
their original order (repeated headers such as ``set-cookie`` stay separate), ``client`` and
``server`` are explicit. Every envelope carries ``"v"``; a reader refuses a version it does not
know instead of guessing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

VERSION = 1

# RFC 9110 section 7.6.1: meaningful for one connection only, never replayed.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class WireFormatError(ValueError):
    """An envelope of an unknown version or shape."""


def _headers(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def _address(value: Any) -> list[Any] | None:
    return [value[0], value[1]] if value else None


def capture_request(
    scope: Mapping[str, Any],
    *,
    app: str,
    route: str,
    owner: str | None,
    headers: list[list[str]],
    sealed: str | None,
) -> dict[str, Any]:
    """The request as the client sent it, for the worker to replay, without its body (which
    ``body_base64`` encodes once, straight into the message). ``headers`` are the latin-1
    pairs left after the credential ones were ``sealed`` (see ``_shared.policy.split_headers``)."""
    raw_path: bytes | None = scope.get("raw_path")
    envelope = {
        "v": VERSION,
        "app": app,
        "route": route,
        "owner": owner,
        "http_version": scope.get("http_version", "1.1"),
        "method": scope["method"],
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "raw_path": raw_path.decode("latin-1") if raw_path is not None else None,
        "root_path": scope.get("root_path", ""),
        "query_string": scope.get("query_string", b"").decode("latin-1"),
        "headers": headers,
        "client": _address(scope.get("client")),
        "server": _address(scope.get("server")),
    }
    if sealed is not None:
        envelope["sealed"] = sealed
    return envelope


# A multiple of 3, so that the pieces' base64 joins into the whole body's base64.
_B64_STEP = 3 * 64 * 1024


def body_base64(body: bytes | bytearray, into: bytearray | None = None) -> bytearray:
    """The body's base64, appended to ``into`` piece by piece: no second full-size copy."""
    out = bytearray() if into is None else into
    view = memoryview(body)
    for start in range(0, len(view), _B64_STEP):
        out += base64.b64encode(view[start : start + _B64_STEP])
    return out


def request_scope(
    envelope: dict[str, Any], headers: list[list[str]]
) -> tuple[dict[str, Any], bytes]:
    """An HTTP scope and body from a captured request; ``headers`` with the sealed ones
    restored.

    The original ``extensions`` are not carried over: a ``pathsend`` file response would come
    back as a path instead of a body.
    """
    raw_path = envelope["raw_path"]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": envelope["http_version"],
        "method": envelope["method"],
        "scheme": envelope["scheme"],
        "path": envelope["path"],
        "raw_path": raw_path.encode("latin-1") if raw_path is not None else None,
        "root_path": envelope["root_path"],
        "query_string": envelope["query_string"].encode("latin-1"),
        "headers": _headers(headers),
        "client": tuple(envelope["client"]) if envelope["client"] else None,
        "server": tuple(envelope["server"]) if envelope["server"] else None,
        "extensions": {},
    }
    return scope, base64.b64decode(envelope["body"])


# The stored response: a magic, the header block's length (4 bytes, big-endian), the header
# block (JSON: [status, [[name, value], ...]] in latin-1), then the body's bytes as they are;
# or, for a body over ``INLINE_BODY``, the same without the body, which is kept apart
# (``<p>body-<id>``, its length in the content-length header). The web side parses a few
# hundred bytes and copies the body out: no decode, whatever its size.
_MAGIC = b"ATM1"
_MAGIC_APART = b"ATM2"
_PREFIX = len(_MAGIC) + 4
#: Larger bodies are stored apart: a poll's one read of the task never carries them, and
#: they are sent in pieces as they are read, never held whole on the event loop.
INLINE_BODY = 64 * 1024


def served_headers(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    """The endpoint's headers as they are served (latin-1 pairs): hop-by-hop ones and
    ``content-length`` dropped, ``cache-control: private, no-store`` added when the endpoint
    set none (the response may belong to one user)."""
    kept = [
        [name.lower().decode("latin-1"), value.decode("latin-1")]
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length"
    ]
    if not any(name == "cache-control" for name, _ in kept):
        kept.append(["cache-control", "private, no-store"])
    return kept


def pack_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The endpoint's response, ready to be served as is: its ``served_headers``, with
    ``content-length`` recomputed."""
    kept = served_headers(headers)
    kept.append(["content-length", str(len(body))])
    block = json.dumps([status, kept], separators=(",", ":")).encode()
    return b"".join((_MAGIC, len(block).to_bytes(4, "big"), block, body))


def _body_start(raw: bytes | memoryview) -> int:
    if raw[: len(_MAGIC)] not in (_MAGIC, _MAGIC_APART) or len(raw) < _PREFIX:
        raise WireFormatError("the stored response is not of a known format")
    return _PREFIX + int.from_bytes(raw[len(_MAGIC) : _PREFIX], "big")


def split_response(packed: bytes) -> tuple[bytes, memoryview | None]:
    """What the worker stores: ``packed`` as it is, or, for a body over ``INLINE_BODY``, the
    header block alone and the body to keep apart (a view: no copy)."""
    end = _body_start(packed)
    if len(packed) - end <= INLINE_BODY:
        return packed, None
    return _MAGIC_APART + packed[len(_MAGIC) : end], memoryview(packed)[end:]


def status_of(head: bytes) -> int | None:
    """The status of a stored response from its first bytes alone (the header block begins
    ``[<status>,``); None when they are not those of one."""
    if head[: len(_MAGIC)] not in (_MAGIC, _MAGIC_APART):
        return None
    block = head[_PREFIX : _PREFIX + 8]
    digits = block[1:4]
    return int(digits) if block[:1] == b"[" and digits.isdigit() else None


def unpack_response(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes | None]:
    """Status, headers and body; the body is None when it is kept apart (its length is the
    ``content-length``)."""
    end = _body_start(raw)
    try:
        status, pairs = json.loads(raw[_PREFIX:end])
        body = raw[end:] if raw[: len(_MAGIC)] == _MAGIC else None
        return int(status), _headers(pairs), body
    except (ValueError, TypeError) as exc:
        raise WireFormatError("the stored response's header block is malformed") from exc


def check(envelope: Any) -> None:
    if not isinstance(envelope, dict) or envelope.get("v") != VERSION:
        version = envelope.get("v") if isinstance(envelope, dict) else None
        raise WireFormatError(f"envelope version {version!r} is not {VERSION}")
