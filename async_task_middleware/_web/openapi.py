"""The protocol in the app's OpenAPI schema: what the middleware answers on marked routes.

``document_tasks(app, routes)`` is the one call, for FastAPI and Litestar apps: each marked
operation gets its ``303`` (with ``Location``), the ``Prefer``, ``Idempotency-Key`` and webhook
headers and the middleware's own errors (and the schema, OpenAPI 3.1's ``webhooks`` entry for
what a receiver is sent); each gets its status path (``<path>/{task_id}``) with the
``202`` status body, the endpoint's own responses (they are the result), ``404``, ``500`` and
the ``DELETE``'s ``204``. ``tasks_openapi(schema, routes)`` does the same to a schema dict.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from .._shared.errors import ConfigurationError
from .._shared.routes import parse_route
from .responses import TYPE_PREFIX

_PROBLEM = {"$ref": "#/components/schemas/AsyncTaskProblem"}
_STATUS = {"$ref": "#/components/schemas/AsyncTaskStatus"}
_SCHEMAS: dict[str, Any] = {
    "AsyncTaskProblem": {
        "type": "object",
        "description": f"Problem details (RFC 9457); `type` is `{TYPE_PREFIX}<kind>`.",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "instance": {"type": "string"},
            "detail": {"type": "string"},
        },
        "required": ["type", "title", "status"],
    },
    "AsyncTaskStatus": {
        "type": "object",
        "description": "A task not yet done (the 202 body).",
        "properties": {
            "task_id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["queued", "running", "retrying"]},
            "progress": {
                "description": "What the endpoint last reported (report_progress), or null.",
                "anyOf": [{"type": "object"}, {"type": "null"}],
            },
            "webhook": {"$ref": "#/components/schemas/AsyncTaskWebhookState"},
        },
        "required": ["task_id", "status", "progress"],
    },
    "AsyncTaskWebhookState": {
        "type": "object",
        "description": "How the task's last webhook delivery went (in the 202 body, once one "
        "was attempted).",
        "properties": {
            "event": {"type": "string", "enum": ["started", "progress", "completed"]},
            "state": {"type": "string", "enum": ["delivered", "retrying", "stopped", "given up"]},
            "attempts": {"type": "integer"},
            "status": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
    },
    "AsyncTaskWebhookEvent": {
        "type": "object",
        "description": "A webhook delivery's body, signed with Standard Webhooks' headers "
        "(webhook-id, webhook-timestamp, webhook-signature).",
        "properties": {
            "type": {"type": "string", "enum": ["task.started", "task.progress", "task.completed"]},
            "timestamp": {"type": "string", "format": "date-time"},
            "data": {
                "type": "object",
                "properties": {
                    "task_id": {"type": "string", "format": "uuid"},
                    "location": {"type": "string", "format": "uri"},
                    "route": {"type": "string"},
                    "status": {
                        "type": "string",
                        "enum": ["running", "done", "failed", "cancelled"],
                    },
                    "http_status": {"type": "integer"},
                    "progress": {},
                },
                "required": ["task_id", "location", "route", "status"],
            },
        },
        "required": ["type", "timestamp", "data"],
    },
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The status URL."}}
_HEADERS = [
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "`wait=N`: hold the answer up to N seconds for the result (RFC 7240); "
        "`respond-async`: answer at once.",
        "schema": {"type": "string"},
    },
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "The same key with the same request names the same task.",
        "schema": {"type": "string", "maxLength": 255},
    },
    {
        "name": "Webhook-URL",
        "in": "header",
        "required": False,
        "description": "Call this URL back as the task starts, reports progress or ends "
        "(Webhook-Events); it must be one the server allows.",
        "schema": {"type": "string", "format": "uri", "maxLength": 2048},
    },
    {
        "name": "Webhook-Events",
        "in": "header",
        "required": False,
        "description": "Comma-separated: started, progress, completed (the default).",
        "schema": {"type": "string"},
    },
]


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _merged(own: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's responses and the middleware's; where both use a status code (a 422 of
    the endpoint's validation and of an Idempotency-Key conflict), both bodies are listed."""
    merged = copy.deepcopy(own)
    for code, answer in added.items():
        if code not in merged:
            merged[code] = copy.deepcopy(answer)
            continue
        mine = merged[code]
        mine["description"] = f"{mine.get('description', '')} Or: {answer['description']}"
        mine.setdefault("content", {}).update(copy.deepcopy(answer.get("content", {})))
        if answer.get("headers"):
            mine.setdefault("headers", {}).update(copy.deepcopy(answer["headers"]))
    return merged


def tasks_openapi(
    schema: dict[str, Any], routes: Iterable[str], tasks_path: str | None = None
) -> dict[str, Any]:
    """``schema`` with the protocol of ``routes`` (``"POST /words"``, as given to the
    middleware) added, and the owner's collection at ``tasks_path`` when given; changed in
    place and returned."""
    schema.setdefault("components", {}).setdefault("schemas", {}).update(copy.deepcopy(_SCHEMAS))
    paths = schema.setdefault("paths", {})
    # OpenAPI 3.1's webhooks: what a receiver of a Webhook-URL is sent.
    schema.setdefault("webhooks", {})["asyncTaskEvent"] = {
        "post": {
            "summary": "A task started, reported progress or ended",
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/AsyncTaskWebhookEvent"}
                    }
                }
            },
            "responses": {
                "200": {"description": "Received; any 2xx will do. 410 Gone stops the retries."}
            },
        }
    }
    for spec in routes:
        method, _ = parse_route(spec)
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", spec.split(None, 1)[1].strip())
        operation = paths.get(path, {}).get(method.lower())
        if operation is None:
            raise ConfigurationError(f"{spec!r} is not an operation of the app's schema")
        own = {code: answer for code, answer in operation.get("responses", {}).items()}
        operation["parameters"] = [*operation.get("parameters", []), *copy.deepcopy(_HEADERS)]
        operation["responses"] = _merged(
            {
                "303": {"description": "Accepted: the task's status URL.", "headers": _LOCATION},
                # With Prefer: wait, a task done in time answers with its own result.
                **own,
            },
            {
                "400": _problem("A malformed Idempotency-Key, or a refused Webhook-URL."),
                "401": _problem("Refused by the authorize hook."),
                "408": _problem("The body did not arrive in time."),
                "413": _problem("The body is too large."),
                "422": _problem("The Idempotency-Key was used for another request."),
                "429": _problem("Too many unfinished tasks for this owner.", _RETRY_AFTER),
                "503": _problem("Queue unavailable or full: nothing queued.", _RETRY_AFTER),
            },
        )
        parameters = [p for p in operation["parameters"] if p.get("in") == "path"]
        task_id = {
            "name": "task_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        }
        name = re.sub(r"\W+", "_", f"{method}_{path}").strip("_").lower()
        paths[f"{path}/{{task_id}}"] = {
            "parameters": [*copy.deepcopy(parameters), task_id],
            "get": {
                "summary": f"The task of {method} {path}",
                "operationId": f"{name}_task",
                "description": "202 while the task runs; then the endpoint's own response. "
                "`Accept: text/event-stream` streams its status instead.",
                "responses": _merged(
                    own,
                    {
                        "202": {
                            "description": "Not done yet.",
                            "headers": _RETRY_AFTER,
                            "content": {"application/json": {"schema": _STATUS}},
                        },
                        "401": _problem("Refused by the authorize hook."),
                        "404": _problem("No such task (unknown, deleted, expired, or another's)."),
                        "500": _problem("The task failed."),
                        "503": _problem("The task store is unavailable.", _RETRY_AFTER),
                    },
                ),
            },
            "delete": {
                "summary": f"Cancel or forget the task of {method} {path}",
                "operationId": f"{name}_task_delete",
                "responses": {
                    "204": {"description": "Deleted: a queued task never runs."},
                    "401": _problem("Refused by the authorize hook."),
                    "404": _problem("No such task (unknown, deleted, expired, or another's)."),
                    "503": _problem("The task store is unavailable.", _RETRY_AFTER),
                },
            },
        }
    if tasks_path is not None:
        paths[tasks_path] = copy.deepcopy(_COLLECTION)
    return schema


_COLLECTION: dict[str, Any] = {
    "get": {
        "summary": "The caller's own tasks, newest first",
        "operationId": "async_task_collection",
        "parameters": [
            {
                "name": "status",
                "in": "query",
                "schema": {
                    "type": "array",
                    "items": {
                        "type": "string",
                        "enum": ["queued", "running", "retrying", "done", "failed"],
                    },
                },
                "explode": True,
            },
            {"name": "route", "in": "query", "schema": {"type": "string"}},
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
            },
            {
                "name": "cursor",
                "in": "query",
                "schema": {"type": "string"},
                "description": "The `next` of the page before (also in `Link: rel=next`).",
            },
        ],
        "responses": {
            "200": {
                "description": "One page of the caller's tasks.",
                "headers": {
                    "Link": {
                        "schema": {"type": "string"},
                        "description": "RFC 8288: the next page, rel=next.",
                    }
                },
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "tasks": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "task_id": {"type": "string", "format": "uuid"},
                                            "location": {"type": "string"},
                                            "route": {"type": "string"},
                                            "status": {"type": "string"},
                                            "created": {"type": "string", "format": "date-time"},
                                            "ended": {
                                                "anyOf": [{"type": "string"}, {"type": "null"}]
                                            },
                                            "http_status": {
                                                "anyOf": [{"type": "integer"}, {"type": "null"}]
                                            },
                                            "progress": {},
                                        },
                                    },
                                },
                                "next": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                            },
                            "required": ["tasks", "next"],
                        }
                    }
                },
            },
            "400": _problem("A malformed query, or a cursor not given for this list."),
            "401": _problem("Refused by the authorize hook."),
            "404": _problem("No list: an anonymous caller's tasks are never listed."),
            "503": _problem("The task store is unavailable.", _RETRY_AFTER),
        },
    }
}


def document_tasks(app: Any, routes: Iterable[str], tasks_path: str | None = None) -> None:
    """Add the protocol of ``routes`` to the OpenAPI schema a FastAPI or Litestar app serves
    (``/docs``, ``/openapi.json``; ``/schema`` on Litestar), and the owner's collection when
    ``tasks_path`` (the middleware's) is given."""
    routes = list(routes)
    if callable(getattr(app, "openapi", None)) and hasattr(app, "openapi_schema"):
        original = app.openapi  # FastAPI: the documented way to extend its schema

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                app.openapi_schema = tasks_openapi(original(), routes, tasks_path)
            schema: dict[str, Any] = app.openapi_schema
            return schema

        app.openapi = openapi
        return
    for plugin in getattr(app, "plugins", ()):
        if hasattr(plugin, "provide_openapi_schema"):
            # Litestar builds its schema once and keeps it: built here, then extended.
            schema = tasks_openapi(plugin.provide_openapi_schema(), routes, tasks_path)
            plugin._openapi_schema = schema
            return
    raise ConfigurationError(
        f"document_tasks: {type(app).__name__} is not a FastAPI or Litestar app"
    )
