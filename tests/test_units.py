"""Pure functions and start-time checks, as parametrized tables."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

import async_task_middleware
from async_task_middleware import AsyncTaskMiddleware, ConfigurationError, WireFormatError
from async_task_middleware._celery import Binding
from async_task_middleware._routes import RouteTable, Status, Submit
from async_task_middleware._wire import (
    capture_request,
    decode_response,
    encode_response,
    request_scope,
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
    ],
)
def test_route_table(method: str, path: str, root_path: str, expected: object) -> None:
    table = RouteTable(["POST /words", "POST /items/{id:int}", "POST /files/{rest:path}"])
    assert table.match(scope(method, path, root_path)) == expected


def test_location_is_never_protocol_relative() -> None:
    table = RouteTable(["POST /{rest:path}"])
    assert table.match(scope("POST", "//evil.example/x")) == Submit("/evil.example/x")


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
    envelope = capture_request(original, b"\x00\xff", "app")
    import json

    envelope = json.loads(json.dumps(envelope))  # only JSON crosses the broker
    replayed, body = request_scope(envelope)
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
    status, kept, body = decode_response(encode_response(201, headers, b"hello"))
    assert status == 201
    assert body == b"hello"
    assert kept == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-length", b"5")]


@pytest.mark.parametrize("envelope", [{"v": 2}, {"status": 200}, None, []])
def test_unknown_envelope_version_refused(envelope: Any) -> None:
    with pytest.raises(WireFormatError):
        decode_response(envelope)


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
    "option", ["max_body_size", "publish_timeout", "read_timeout", "retry_after", "max_connections"]
)
def test_nonpositive_options_refused(option: str) -> None:
    with pytest.raises(ConfigurationError, match=option):
        AsyncTaskMiddleware(
            lambda *a: None,  # type: ignore[arg-type, return-value]
            celery_app=celery(),
            routes=["POST /x"],
            **{option: 0},
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
    assert public == set(async_task_middleware.__all__)
    for name in async_task_middleware.__all__:
        assert getattr(async_task_middleware, name).__module__.startswith("async_task_middleware")
