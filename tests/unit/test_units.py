"""Pure functions and start-time checks, as parametrized tables."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

import async_task_middleware
from async_task_middleware import AsyncTaskMiddleware, ConfigurationError, WireFormatError
from async_task_middleware._shared.binding import Binding
from async_task_middleware._shared.policy import (
    CREDENTIAL_HEADERS,
    Keys,
    join_headers,
    split_headers,
)
from async_task_middleware._shared.routes import RouteTable, Status, Submit
from async_task_middleware._shared.wire import (
    body_base64,
    capture_request,
    pack_response,
    request_scope,
    unpack_response,
)

URL = "redis://127.0.0.1:6379/15"
TASK = "3f2c5b1e-8a7d-4c3b-9e1f-0a2b3c4d5e6f"


def scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": root_path}


@pytest.mark.parametrize(
    ("method", "path", "root_path", "expected"),
    [
        ("POST", "/words", "", Submit("/words")),
        ("GET", "/words", "", None),
        ("POST", "/words/", "", None),
        ("POST", "/other", "", None),
        ("POST", "/api/words", "/api", Submit("/api/words")),
        ("POST", "/words", "/api", Submit("/api/words")),  # servers that leave root_path out
        ("GET", f"/words/{TASK}", "", Status(TASK, "/words")),
        ("DELETE", f"/api/words/{TASK}", "/api", Status(TASK, "/api/words")),
        ("PATCH", f"/words/{TASK}", "", Status(TASK, "/words")),
        ("GET", "/words/not-an-id", "", Status(None, "/words")),
        ("GET", f"/words/{TASK.upper()}", "", Status(None, "/words")),
        ("POST", "/items/7", "", Submit("/items/7")),
        ("POST", "/items/x", "", None),
        ("GET", f"/items/7/{TASK}", "", Status(TASK, "/items/7")),
        ("GET", f"/words/{TASK}/more", "", None),
        ("POST", "/files/a b/ü", "", Submit("/files/a%20b/%C3%BC")),
        # Control characters are the literal characters they are: '$' in Python also matches
        # before a final newline, which once made '/words\n' the marked route.
        ("POST", "/words\n", "", None),
        ("POST", "/items/7\n", "", None),
        ("GET", f"/words/{TASK}\n", "", Status(None, "/words")),
        ("GET", f"/words\n/{TASK}", "", None),
    ],
)
def test_route_table(method: str, path: str, root_path: str, expected: object) -> None:
    table = RouteTable(["POST /words", "POST /items/{id:int}", "POST /files/{rest:path}"])
    found = table.match(scope(method, path, root_path))
    if isinstance(expected, Status):
        assert isinstance(found, Status)
        assert (found.task_id, found.location) == (expected.task_id, expected.location)
    else:
        assert (found.location if found else None) == (expected.location if expected else None)  # type: ignore[union-attr]
        assert type(found) is type(expected)


def test_malformed_and_unknown_ids_share_one_instance_form() -> None:
    table = RouteTable(["POST /words"])
    unknown = table.match(scope("GET", f"/words/{TASK}"))
    malformed = table.match(scope("GET", "/words/not-an-id\r"))
    assert isinstance(unknown, Status)
    assert isinstance(malformed, Status)
    assert unknown.instance == f"/words/{TASK}"
    assert malformed.instance == "/words/not-an-id%0D"


def test_location_is_never_protocol_relative() -> None:
    table = RouteTable(["POST /{rest:path}"])
    found = table.match(scope("POST", "//evil.example/x"))
    assert isinstance(found, Submit)
    assert found.location == "/evil.example/x"


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ("POST /words", "list"),
        ([], "empty"),
        (["/words"], "METHOD /path"),
        (["POST words"], "METHOD /path"),
        (["POST /words/"], "trailing slash"),
    ],
)
def test_bad_routes_refused(routes: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        RouteTable(routes)


def test_request_envelope_round_trip() -> None:
    original = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/api/words",
        "raw_path": b"/api/words",
        "root_path": "/api",
        "query_string": b"a=1&a=%FF",
        "headers": [(b"x-a", b"1"), (b"x-a", b"\xe9"), (b"cookie", b"k=v")],
        "client": ("10.0.0.1", 1234),
        "server": ("example", 443),
        "extensions": {"http.response.pathsend": {}},
    }
    keys = Keys("k" * 32)
    pairs, sealed = split_headers(original["headers"], CREDENTIAL_HEADERS, keys)
    assert pairs == [["x-a", "1"], ["x-a", "\xe9"]]  # the cookie is sealed, not in clear
    assert sealed is not None
    assert "k=v" not in sealed
    envelope = capture_request(
        original, app="app", route="POST /words", owner=None, headers=pairs, sealed=sealed
    )
    envelope["body"] = body_base64(b"\x00\xff").decode()
    import json

    envelope = json.loads(json.dumps(envelope))  # only JSON crosses the broker
    headers = join_headers(envelope["headers"], envelope["sealed"], keys)
    replayed, body = request_scope(envelope, headers)
    assert body == b"\x00\xff"
    for key in ("method", "scheme", "path", "raw_path", "root_path", "query_string", "headers"):
        assert replayed[key] == original[key], key
    assert replayed["client"] == ("10.0.0.1", 1234)
    assert replayed["server"] == ("example", 443)
    assert replayed["extensions"] == {}


def test_response_envelope_drops_hop_by_hop_and_recounts() -> None:
    headers = [
        (b"Set-Cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"999"),
        (b"connection", b"close"),
    ]
    status, kept, body = unpack_response(pack_response(201, headers, b"hello"))
    assert status == 201
    assert body == b"hello"
    assert kept == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"cache-control", b"private, no-store"),  # none set: the response may be one user's
        (b"content-length", b"5"),
    ]
    own = [(b"Cache-Control", b"public, max-age=60")]
    assert unpack_response(pack_response(200, own, b""))[1] == [
        (b"cache-control", b"public, max-age=60"),
        (b"content-length", b"0"),
    ]


@pytest.mark.parametrize("raw", [b"", b"ATM1", b"ATM1\x00\x00\x00\x05[200", b"{}", b"ATM2...."])
def test_unknown_stored_response_refused(raw: bytes) -> None:
    with pytest.raises(WireFormatError):
        unpack_response(raw)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 196607, 196608, 196609, 1_000_003])
def test_body_base64_in_pieces_is_the_whole_base64(size: int) -> None:
    import base64
    import os

    body = os.urandom(size)
    assert bytes(body_base64(body)) == base64.b64encode(body)


def test_sealed_headers_need_the_key_and_keep_their_order() -> None:
    from async_task_middleware import SealError

    headers = [(b"authorization", b"Bearer t"), (b"x", b"1"), (b"cookie", b"s=1"), (b"y", b"2")]
    old, new = Keys("o" * 32), Keys(["n" * 32, "o" * 32])
    pairs, sealed = split_headers(headers, CREDENTIAL_HEADERS, old)
    assert pairs == [["x", "1"], ["y", "2"]]
    # Rotation: a key list that still holds the old key opens what the old key sealed.
    assert join_headers(pairs, sealed, new) == [[k.decode(), v.decode()] for k, v in headers]
    with pytest.raises(SealError):
        join_headers(pairs, sealed, Keys("x" * 32))
    with pytest.raises(SealError):
        join_headers(pairs, sealed, None)
    assert split_headers(headers, CREDENTIAL_HEADERS, None) == ([["x", "1"], ["y", "2"]], None)


def test_header_owner() -> None:
    from async_task_middleware import header_owner

    by_auth = header_owner("Authorization")
    by_cookie = header_owner(cookies=["session"])

    def scope_with(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"headers": list(headers)}

    assert by_auth(scope_with()) is None
    assert by_auth(scope_with((b"authorization", b"a"))) != by_auth(
        scope_with((b"authorization", b"b"))
    )
    assert by_cookie(scope_with((b"cookie", b"session=1; other=2"))) != by_cookie(
        scope_with((b"cookie", b"session=2; other=2"))
    )
    assert by_cookie(scope_with((b"cookie", b"other=2"))) is None
    assert by_cookie(scope_with((b"cookie", b"\x00;;=="))) is None
    tags = Keys("k" * 32).owner_tags(b"alice")
    assert len(tags) == 1
    assert "alice" not in tags[0]
    assert len(tags[0]) == 64


def test_owner_hashes_are_the_hmacs_of_the_identity_one_per_key() -> None:
    """The stored owner is the HMAC-SHA256 of the identity under each key, newest first:
    tasks written before a key rotation stay readable under the older key."""
    import hashlib
    import hmac

    from async_task_middleware._shared import policy

    keys = Keys(["n" * 32, "o" * 32])
    expected = tuple(
        hmac.new(policy._derive(k, b"owner"), b"alice", hashlib.sha256).hexdigest()
        for k in (b"n" * 32, b"o" * 32)
    )
    assert keys.owner_tags(b"alice") == expected
    assert keys.owner_tags(b"alice\x00") != expected
    assert keys.owner_tags(b"bob") != expected
    huge = b"Bearer " + b"\x7f\r\n" * 100_000
    assert keys.owner_tags(huge) == keys.owner_tags(huge) != expected


def celery(**conf: Any) -> Celery:
    app = Celery("t", broker=conf.pop("broker", URL), backend=conf.pop("backend", URL))
    app.conf.update(**conf)
    return app


@pytest.mark.parametrize(
    ("conf", "setting"),
    [
        ({"accept_content": ["json", "pickle"]}, "accept_content"),
        ({"task_serializer": "pickle"}, "task_serializer"),
        ({"result_serializer": "pickle"}, "result_serializer"),
        ({"result_accept_content": ["pickle"]}, "result_accept_content"),
        ({"result_extended": True}, "result_extended"),
        ({"result_expires": None}, "result_expires"),
        ({"backend": "rpc://"}, "result_backend"),
    ],
)
def test_unsafe_celery_settings_refused(conf: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        AsyncTaskMiddleware(lambda *a: None, celery_app=celery(**conf), routes=["POST /x"])  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigurationError, match=setting):
        async_task_middleware.register_replay(celery(**conf), {"default": "x:y"})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        (option, value)
        for option in (
            "max_body_size",
            "body_timeout",
            "publish_timeout",
            "read_timeout",
            "retry_after",
            "max_connections",
            "max_queued_per_route",
        )
        for value in (0, -1, "5", True, None)
        if not (value is None and option == "max_queued_per_route")
    ]
    + [
        ("retry_after", 1.5),
        ("max_body_size", 2.0),
        ("debug", "yes"),
        ("name", ""),
        ("secret_key", "short"),
        ("secret_key", []),
        ("owner", "authorization"),
        ("credential_headers", "x-api-key"),
        ("max_tasks_per_owner", 5),  # without owner=
        ("authorize", True),
    ],
)
def test_bad_options_refused(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        AsyncTaskMiddleware(
            lambda *a: None,  # type: ignore[arg-type, return-value]
            celery_app=celery(),
            routes=["POST /x"],
            **{option: value},
        )


@pytest.mark.parametrize(
    ("conf", "native"),
    [
        ({}, True),
        ({"broker": "redis://127.0.0.1:6379/14"}, False),  # not the store's Redis
        (
            {
                "broker": "amqp://guest:guest@127.0.0.1:5672//",
                "broker_transport_options": {"confirm_publish": True},
            },
            False,
        ),
        ({"broker_transport_options": {"global_keyprefix": "p:"}}, False),
        ({"task_default_priority": 5}, False),
        ({"task_default_queue": "jobs"}, True),
    ],
)
def test_native_publish_only_when_nothing_is_bypassed(conf: dict[str, Any], native: bool) -> None:
    binding = Binding.of(celery(**conf))
    assert (binding.fast_queue is not None) is native
    if native:
        assert binding.fast_queue == conf.get("task_default_queue", "celery")


def test_register_replay_twice_refused() -> None:
    app = celery()
    async_task_middleware.register_replay(app, {"default": "x:y"})
    with pytest.raises(ConfigurationError, match="already"):
        async_task_middleware.register_replay(app, {"default": "x:y"})


def test_public_names() -> None:
    public = {name for name in dir(async_task_middleware) if not name.startswith("_")}
    # The client is a submodule of its own (its extra's httpx), there once it is imported.
    assert public - {"client"} == set(async_task_middleware.__all__)
    for name in async_task_middleware.__all__:
        assert getattr(async_task_middleware, name).__module__.startswith("async_task_middleware")


@pytest.mark.parametrize("size", [0, 5, 1024 * 1024 - 1, 1024 * 1024 + 7, 3 * 1024 * 1024 + 11])
def test_example_word_count_over_chunks(size: int) -> None:
    from examples.wordcount.counting import word_count

    text = ("lorem ipsum dolor " * (size // 18 + 1))[:size]
    assert word_count(text) == len(text.split())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-request-id", b"req-42.a:b/c+d=")], "req-42.a:b/c+d="),
        (
            [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        # X-Request-ID wins over traceparent, wherever it comes.
        (
            [
                (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                (b"x-request-id", b"mine"),
            ],
            "mine",
        ),
        # Hostile or malformed: left out, never logged.
        ([(b"x-request-id", b"a\x1b[31mred")], None),
        ([(b"x-request-id", b"line\nbreak")], None),
        ([(b"x-request-id", b"has space")], None),
        ([(b"x-request-id", b"x" * 129)], None),
        ([(b"x-request-id", b"")], None),
        ([(b"x-request-id", "é".encode())], None),
        ([(b"traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")], None),
        ([(b"traceparent", b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")], None),
        ([(b"traceparent", b"00-4bf92f35-00f067aa0ba902b7-01")], None),
        ([], None),
    ],
)
def test_request_id_takes_only_plain_tokens(
    headers: list[tuple[bytes, bytes]], expected: str | None
) -> None:
    from async_task_middleware._web.headers import request_id

    assert request_id(headers) == expected


@pytest.mark.parametrize("code", [100, 200, 204, 404, 503, 599])
def test_a_stored_responses_status_from_its_first_bytes(code: int) -> None:
    from async_task_middleware._shared.wire import pack_response, split_response, status_of

    # Header blocks of every length: the length prefix may hold a '[' byte of its own.
    for padding in (0, 1, 91 - 40, 300):
        packed = pack_response(code, [(b"x-pad", b"p" * padding)], b"body")
        assert status_of(packed[:64]) == code
        head, _ = split_response(pack_response(code, [], b"b" * 400_000))
        assert status_of(head[:64]) == code
    assert status_of(b"FAILED") is None
    assert status_of(b"") is None
