"""A submission's ``Webhook-URL``, checked before anything is enqueued.

The URL must match one of the operator's rules (``Webhooks.allow``) and resolve, every one of
its addresses, to a public one, unless a rule names its host exactly: so that no client can
point the worker at the operator's own network (server-side request forgery). The address it
resolved to is kept with the task, and the delivery connects there, not to a second lookup's
answer (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit

import anyio
import anyio.to_thread

from .._shared.binding import Binding
from .._shared.routes import Route
from .._shared.webhooks import DEFAULT_PORTS, Webhooks, event, parse_events, publish
from .settings import Settings

logger = logging.getLogger(__name__)

MAX_URL = 2048


class BadWebhook(ValueError):
    """Why a ``Webhook-URL`` (or ``Webhook-Events``) is refused; the text is the 400's detail,
    and never repeats the URL (it may carry a token)."""


class BadRouteWebhook(BadWebhook):
    """The route's own webhook (``Route(webhook=)``) is refused: the operator's to fix."""


async def check_hook(
    headers: Iterable[tuple[bytes, bytes]],
    webhooks: Webhooks | None,
    timeout: float,
    route: Route | None = None,
) -> dict[str, Any] | None:
    """The submission's webhook (``url``, ``address``, ``events``), None when it asks for
    none; ``BadWebhook`` when it may not have it. Without a ``Webhook-URL``, the route's own
    (``BadRouteWebhook`` when it is refused)."""
    urls, events = [], []
    for name, value in headers:
        if name == b"webhook-url":
            urls.append(value)
        elif name == b"webhook-events":
            events.append(value)
    if not urls and route is not None and route.webhook is not None and not events:
        fixed = [(b"webhook-url", route.webhook.encode())]
        fixed.append((b"webhook-events", route.webhook_events.encode("latin-1")))
        try:
            return await check_hook(fixed, webhooks, timeout)
        except BadWebhook as exc:
            raise BadRouteWebhook(str(exc)) from None
    if not urls:
        if events:
            raise BadWebhook("Webhook-Events without a Webhook-URL")
        return None
    if len(urls) > 1:
        raise BadWebhook("more than one Webhook-URL")
    if webhooks is None or not webhooks.allow:
        raise BadWebhook("webhooks are not enabled on this server")
    wanted = parse_events(v.decode("latin-1") for v in events) if events else {"completed"}
    if wanted is None:
        raise BadWebhook("Webhook-Events names only started, progress and completed")
    text, host, port, exact, address = _checked(urls[0], tuple(webhooks.allow))
    if address is None:
        address = await _resolve(host, port, exact, timeout)
    return {"url": text, "address": address, "events": sorted(wanted)}


@functools.lru_cache(maxsize=1024)
def _checked(raw: bytes, rules: tuple[str, ...]) -> tuple[str, str, int, bool, str | None]:
    """What a URL's text alone decides (the rules, and an address written out), kept for the
    next submission to the same URL; a name is resolved again each time. A refusal raises,
    and is not kept."""
    url = _parse(raw)
    host = url.hostname or ""
    port = url.port or DEFAULT_PORTS[url.scheme]
    exact = _allowed(rules, url, host, port)
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return url.geturl(), host, port, exact, None
    return url.geturl(), host, port, exact, _public([host.strip("[]")], exact)


def _parse(raw: bytes) -> SplitResult:
    if len(raw) > MAX_URL:
        raise BadWebhook(f"the Webhook-URL is longer than {MAX_URL} characters")
    if any(c < 0x21 or c >= 0x7F for c in raw) or b"\\" in raw:
        raise BadWebhook("the Webhook-URL has control, space or non-ASCII characters")
    try:
        url = urlsplit(raw.decode("ascii"))
        url.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        raise BadWebhook("the Webhook-URL is malformed") from None
    if url.scheme not in DEFAULT_PORTS:
        raise BadWebhook("the Webhook-URL must be http or https")
    if "@" in url.netloc:
        raise BadWebhook("the Webhook-URL may not carry credentials")
    if not url.hostname or url.fragment:
        raise BadWebhook("the Webhook-URL needs a host, and no fragment")
    return url


def _allowed(rules: Sequence[str], url: SplitResult, host: str, port: int) -> bool:
    """Whether a rule allows ``url``: True when one names its host exactly (which allows an
    address that is not public), False when only a pattern does; ``BadWebhook`` when none."""
    matched = False
    for rule in rules:
        if "://" in rule:
            allowed = urlsplit(rule)
            same_place = (
                allowed.scheme == url.scheme
                and allowed.hostname == host
                and (allowed.port or DEFAULT_PORTS.get(allowed.scheme)) == port
            )
            path = allowed.path or "/"
            if same_place and (url.path or "/").startswith(path):
                return True
        elif rule == host:
            return True
        elif rule == "*" or (rule.startswith("*.") and host.endswith(rule[1:])):
            matched = True
    if not matched:
        raise BadWebhook("the Webhook-URL is not one this server may call")
    return False


async def _resolve(host: str, port: int, exact: bool, timeout: float) -> str:
    """The address the delivery will connect to: the first that ``host`` resolves to, when
    all of them may be called."""
    return _public(await _lookup(host, port, timeout), exact)


def _public(found: list[str], exact: bool) -> str:
    """The first of ``found``, when every one is public (or the rule named the host exactly);
    an IPv4-mapped IPv6 address counts as the IPv4 one it maps."""
    addresses = []
    for text in found:
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not exact and (not address.is_global or address.is_multicast):
            raise BadWebhook("the Webhook-URL's host is not a public address")
        addresses.append(str(address))
    if not addresses:
        raise BadWebhook("the Webhook-URL's host does not resolve")
    return addresses[0]


async def _lookup(host: str, port: int, timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise BadWebhook("the Webhook-URL's host does not resolve") from None
    return [str(sockaddr[0]) for *_, sockaddr in found]


async def send_cancelled(
    binding: Binding, settings: Settings, hook: dict[str, Any], task_id: str
) -> None:
    """The ``completed`` event of a task deleted before it ended, published through Celery in
    a thread, within ``publish_timeout``; after the 204, whose answer it never holds up."""
    if settings.webhooks is None:
        return
    sent = event("completed", hook, task_id, status="cancelled")
    send = functools.partial(publish, binding.celery_app, settings.webhooks.queue, sent)
    try:
        with anyio.fail_after(settings.publish_timeout):
            await anyio.to_thread.run_sync(send, abandon_on_cancel=True)
    except Exception as exc:
        logger.warning("task %s: its cancelled webhook was not sent: %s", task_id, exc)
