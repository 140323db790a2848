"""The JSON envelopes that cross the broker and the result backend.

Only JSON crosses: bodies are base64, headers are ``[name, value]`` pairs of latin-1 strings in
their original order (repeated headers such as ``set-cookie`` stay separate), ``client`` and
``server`` are explicit. Every envelope carries ``"v"``; a reader refuses a version it does not
know instead of guessing.
"""

from __future__ import annotations

import base64
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


def _pairs(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]


def _headers(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def _address(value: Any) -> list[Any] | None:
    return [value[0], value[1]] if value else None


def capture_request(scope: Mapping[str, Any], body: bytes, app_name: str) -> dict[str, Any]:
    """The request as the client sent it, for the worker to replay."""
    raw_path: bytes | None = scope.get("raw_path")
    return {
        "v": VERSION,
        "app": app_name,
        "http_version": scope.get("http_version", "1.1"),
        "method": scope["method"],
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "raw_path": raw_path.decode("latin-1") if raw_path is not None else None,
        "root_path": scope.get("root_path", ""),
        "query_string": scope.get("query_string", b"").decode("latin-1"),
        "headers": _pairs(scope.get("headers", [])),
        "client": _address(scope.get("client")),
        "server": _address(scope.get("server")),
        "body": base64.b64encode(body).decode("ascii"),
    }


def request_scope(envelope: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """An HTTP scope and body from a captured request.

    The original ``extensions`` are not carried over: a ``pathsend`` file response would come
    back as a path instead of a body.
    """
    _check(envelope)
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
        "headers": _headers(envelope["headers"]),
        "client": tuple(envelope["client"]) if envelope["client"] else None,
        "server": tuple(envelope["server"]) if envelope["server"] else None,
        "extensions": {},
    }
    return scope, base64.b64decode(envelope["body"])


def encode_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, Any]:
    """The endpoint's response, ready to be served as is: hop-by-hop headers dropped and
    ``content-length`` recomputed once here, so the web side only copies."""
    kept = [
        (name.lower(), value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length"
    ]
    kept.append((b"content-length", str(len(body)).encode("latin-1")))
    return {
        "v": VERSION,
        "status": status,
        "headers": _pairs(kept),
        "body": base64.b64encode(body).decode("ascii"),
    }


def decode_response(envelope: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    _check(envelope)
    return (
        int(envelope["status"]),
        _headers(envelope["headers"]),
        base64.b64decode(envelope["body"]),
    )


def _check(envelope: Any) -> None:
    if not isinstance(envelope, dict) or envelope.get("v") != VERSION:
        version = envelope.get("v") if isinstance(envelope, dict) else None
        raise WireFormatError(f"envelope version {version!r} is not {VERSION}")
