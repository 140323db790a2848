"""The Webhook-URL check: what may be called back, and every hostile form refused before
anything is enqueued. The names resolve through this machine's resolver (``localhost``)."""

from __future__ import annotations

import pytest

from async_task_middleware import ConfigurationError, Webhooks
from async_task_middleware._web.hooks import BadWebhook, check_hook

pytestmark = pytest.mark.anyio

ANYWHERE = Webhooks(allow=["*"])


def headers(url: bytes, events: bytes | None = None) -> list[tuple[bytes, bytes]]:
    found = [(b"webhook-url", url)]
    return found + ([(b"webhook-events", events)] if events is not None else [])


@pytest.mark.parametrize(
    "url",
    [
        b"http://127.0.0.1/hook",  # loopback
        b"http://localhost/hook",  # a name that resolves to loopback
        b"http://localhost./hook",  # ... with a trailing dot
        b"http://2130706433/hook",  # 127.0.0.1 in decimal
        b"http://0177.0.0.1/hook",  # ... in octal
        b"http://0x7f.1/hook",  # ... in hex, shortened
        b"http://[::1]/hook",  # IPv6 loopback
        b"http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped IPv6
        b"http://10.0.0.8/hook",  # private
        b"http://192.168.1.1/hook",
        b"http://172.16.0.1/hook",
        b"http://169.254.169.254/latest/meta-data/",  # cloud metadata, link-local
        b"http://[fd00:ec2::254]/",  # the IPv6 metadata address, private
        b"http://100.100.100.200/",  # shared address space (a cloud's metadata)
        b"http://224.0.0.1/",  # multicast
        b"http://0.0.0.0/",  # unspecified
        b"http://[fe80::1]/",  # IPv6 link-local
        b"ftp://example.com/",  # not http(s)
        b"file:///etc/passwd",
        b"javascript:alert(1)",
        b"https://allowed.example@evil.example/",  # userinfo tricks
        b"https://user:pass@example.com/",
        b"https://example.com/#fragment",
        b"https://exa mple.com/",  # a space
        b"https://example.com/\r\nX-Injected: 1",  # control characters
        b"https://example.com/\x00",
        b"https://example.com\\@evil.example/",  # a backslash
        b"https://\xc3\xa9xample.com/",  # not ASCII
        b"https://example.com:99999/",  # a malformed port
        b"https://example.com:x/",
        b"https:///nohost",
        b"https://" + b"a" * 2100 + b".com/",  # over 2,048 characters
        b"https://no-such-host.invalid/",  # does not resolve
        b"",
    ],
)
async def test_a_hostile_url_is_refused(url: bytes) -> None:
    with pytest.raises(BadWebhook) as refused:
        await check_hook(headers(url), ANYWHERE, timeout=2)
    assert url.decode("latin-1")[8:] not in str(refused.value) or not url[8:]  # never echoed


async def test_nothing_is_allowed_by_default() -> None:
    with pytest.raises(BadWebhook, match="not enabled"):
        await check_hook(headers(b"https://example.com/"), None, timeout=2)
    with pytest.raises(BadWebhook, match="not enabled"):
        await check_hook(headers(b"https://example.com/"), Webhooks(), timeout=2)


async def test_a_rule_that_names_a_loopback_host_exactly_allows_it() -> None:
    exact = Webhooks(allow=["http://127.0.0.1:8123/hooks/"])
    hook = await check_hook(headers(b"http://127.0.0.1:8123/hooks/a?token=x"), exact, timeout=2)
    assert hook == {
        "url": "http://127.0.0.1:8123/hooks/a?token=x",
        "address": "127.0.0.1",
        "events": ["completed"],
    }
    for other in (
        b"http://127.0.0.1:8124/hooks/a",
        b"http://127.0.0.1:8123/other",
        b"https://127.0.0.1:8123/hooks/",
    ):
        with pytest.raises(BadWebhook, match="not one this server may call"):
            await check_hook(headers(other), exact, timeout=2)
    named = Webhooks(allow=["localhost"])
    assert (await check_hook(headers(b"http://localhost:9/x"), named, timeout=2))["address"] in (
        "127.0.0.1",
        "::1",
    )


async def test_a_pattern_does_not_allow_a_private_address() -> None:
    pattern = Webhooks(allow=["*.localhost", "*"])
    with pytest.raises(BadWebhook, match="not a public address"):
        await check_hook(headers(b"http://localhost/"), pattern, timeout=2)
    only = Webhooks(allow=["*.example.com"])
    for url in (b"https://example.com.evil.net/", b"https://evilexample.com/"):
        with pytest.raises(BadWebhook, match="not one this server may call"):
            await check_hook(headers(url), only, timeout=2)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (b"completed", ["completed"]),
        (b"started, progress,completed", ["completed", "progress", "started"]),
        (b" PROGRESS ", ["progress"]),
    ],
)
async def test_webhook_events(events: bytes, expected: list[str]) -> None:
    exact = Webhooks(allow=["http://127.0.0.1:8123/"])
    hook = await check_hook(headers(b"http://127.0.0.1:8123/", events), exact, timeout=2)
    assert hook is not None
    assert hook["events"] == expected


@pytest.mark.parametrize("events", [b"", b"done", b"completed,other", b",", b"x" * 5000])
async def test_unknown_webhook_events_are_refused(events: bytes) -> None:
    exact = Webhooks(allow=["http://127.0.0.1:8123/"])
    with pytest.raises(BadWebhook, match="Webhook-Events"):
        await check_hook(headers(b"http://127.0.0.1:8123/", events), exact, timeout=2)


async def test_repeated_or_lone_headers_are_refused() -> None:
    exact = Webhooks(allow=["http://127.0.0.1:8123/"])
    twice = headers(b"http://127.0.0.1:8123/") * 2
    with pytest.raises(BadWebhook, match="more than one"):
        await check_hook(twice, exact, timeout=2)
    with pytest.raises(BadWebhook, match="without a Webhook-URL"):
        await check_hook([(b"webhook-events", b"completed")], exact, timeout=2)
    assert await check_hook([], exact, timeout=2) is None


@pytest.mark.parametrize(
    "options",
    [
        {"allow": "https://a.example/"},  # a string, not a list
        {"allow": [""]},
        {"allow": ["https://a.example/\n"]},
        {"secret": "not-a-whsec"},
        {"secret": "whsec_!!!"},
        {"secret": "whsec_c2hvcnQ="},  # under 16 bytes
        {"timeout": 0},
        {"timeout": True},
        {"schedule": (-1,)},
    ],
)
def test_bad_settings_are_refused_at_start(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Webhooks(**options)  # type: ignore[arg-type]
