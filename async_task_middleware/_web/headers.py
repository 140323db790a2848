"""The request headers the protocol reads: ``Prefer`` (RFC 7240), ``Idempotency-Key`` (the
IETF httpapi draft), and the request id an operator joins the logs by (``X-Request-ID``, or the
trace id of a W3C ``traceparent``), parsed by small total functions that never raise on
hostile input."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# RFC 7240 section 2: preference = token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )
_PREFERENCE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("[^"]*"|[^\s;,]*))?')
# Visible ASCII, 1 to 255 characters.
_KEY = re.compile(rb"[\x21-\x7e]{1,255}")
# What a log line may show of a client's request id: no spaces, quotes or control characters.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
# W3C Trace Context: version-traceid-parentid-flags; an all-zero trace id is invalid.
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass(frozen=True, slots=True)
class Prefer:
    wait: float | None = None
    respond_async: bool = False


NO_PREFERENCE = Prefer()


def parse_prefer(headers: Iterable[tuple[bytes, bytes]]) -> Prefer:
    """``wait=N`` (seconds, a non-negative number) and ``respond-async``; anything else,
    including malformed values, is ignored, as RFC 7240 asks of a server."""
    wait: float | None = None
    respond_async = False
    for name, value in headers:
        if name != b"prefer":
            continue
        text = value.decode("latin-1")
        for item in text.split(","):
            match = _PREFERENCE.match(item.split(";", 1)[0])
            if match is None:
                continue
            preference = match[1].lower()
            argument = (match[2] or "").strip('"')
            if preference == "respond-async":
                respond_async = True
            elif (
                preference == "wait"
                and wait is None
                and re.fullmatch(r"\d{1,9}(\.\d{1,6})?", argument)
            ):
                wait = float(argument)
    if wait is None and not respond_async:
        return NO_PREFERENCE
    return Prefer(wait, respond_async)


class BadIdempotencyKey(ValueError):
    pass


def idempotency_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The ``Idempotency-Key`` (an sf-string per the draft; a bare token is accepted too), or
    None. Raises ``BadIdempotencyKey`` when it is empty, longer than 255 characters, not
    visible ASCII, or sent more than once."""
    keys = [value for name, value in headers if name == b"idempotency-key"]
    if not keys:
        return None
    if len(keys) > 1:
        raise BadIdempotencyKey("send one Idempotency-Key, not several")
    key = keys[0].strip(b" \t")
    if len(key) >= 2 and key[:1] == b'"' and key[-1:] == b'"':
        key = key[1:-1]
    if not _KEY.fullmatch(key):
        raise BadIdempotencyKey("an Idempotency-Key is 1 to 255 visible ASCII characters")
    return key


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's id for the logs: ``X-Request-ID`` when it is a plain token, else the
    trace id of a valid ``traceparent``, else None (a hostile value is left out, not logged)."""
    trace: str | None = None
    for name, value in headers:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
        if name == b"traceparent" and trace is None:
            match = _TRACEPARENT.fullmatch(value.strip())
            if match and match[1] != b"0" * 32:
                trace = match[1].decode("ascii")
    return trace


# RFC 9110 section 14.1.2: one byte range, of the three forms (``N-``, ``N-M``, ``-S``).
_RANGE = re.compile(rb"bytes=(\d{0,15})-(\d{0,15})")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One range as asked: from ``start`` to ``end`` (inclusive, None: to the end), or the last
    ``suffix`` bytes."""

    start: int | None
    end: int | None = None

    def resolve(self, length: int) -> tuple[int, int] | None:
        """The range's first and last byte in a body of ``length`` bytes; None when it holds
        none of them (a 416)."""
        if self.start is None:  # the last ``end`` bytes
            if not self.end or not length:
                return None
            return max(0, length - self.end), length - 1
        if self.start >= length:
            return None
        return self.start, length - 1 if self.end is None else min(self.end, length - 1)


def parse_range(headers: Iterable[tuple[bytes, bytes]]) -> ByteRange | None:
    """The one byte range a ``Range`` header asks for; None for none, for several ranges (or
    several headers), for a malformed one, and under ``If-Range``, whose validator this server
    cannot check (it sends none): RFC 9110 lets a server ignore ``Range``, and the whole
    response is then served."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"if-range" or (name == b"range" and found is not None):
            return None
        if name == b"range":
            found = value
    if found is None:
        return None
    match = _RANGE.fullmatch(found.strip().lower())  # the unit is case-insensitive
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:
        return ByteRange(None, int(match[2]))
    start, end = int(match[1]), int(match[2]) if match[2] else None
    if end is not None and end < start:
        return None
    return ByteRange(start, end)
