"""The native publish's message, from its template, is the message Celery and kombu would make."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from celery import Celery

from async_task_middleware._shared.binding import TASK_NAME
from async_task_middleware._shared.message import MessageTemplates


def _celery() -> Celery:
    return Celery("m", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")


def _made_by_celery(
    app: Celery, task_id: str, envelope: dict[str, Any], body: bytes, queue: str, limit: Any
) -> dict[str, Any]:
    """What kombu's Redis channel pushes for ``send_task``, made by Celery for this message."""
    task = app.amqp.as_task_v2(
        task_id,
        TASK_NAME,
        args=({**envelope, "body": base64.b64encode(body).decode()},),
        kwargs={},
        argsrepr=repr((envelope["route"],)),
        kwargsrepr="{}",
        time_limit=limit,
        ignore_result=True,
    )
    properties = {
        **task.properties,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "delivery_tag": "-",
    }
    return {
        "body": json.loads(json.dumps(task.body)),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": json.loads(json.dumps(task.headers)),
        "properties": properties,
    }


ENVELOPES = [
    {"v": 1, "route": "POST /words", "headers": [["x-name", 'caf\u00e9 "quoted" \\ \t']]},
    {"v": 1, "route": 'POST /a"b\\c', "path": "/\u00ff\n", "headers": [], "owner": None},
]


@pytest.mark.parametrize("envelope", ENVELOPES)
@pytest.mark.parametrize(("queue", "limit"), [(None, None), ("reports", 620.0)])
@pytest.mark.parametrize("body", [b"", b"hello", bytes(range(256)) * 1000])
def test_template_message_is_celerys(
    envelope: dict[str, Any], queue: str | None, limit: float | None, body: bytes
) -> None:
    app = _celery()
    templates = MessageTemplates(app, TASK_NAME, "celery")
    tags = set()
    for _ in range(2):  # the second message comes from the template made for the first
        task_id = str(uuid.uuid4())
        raw = templates.build(task_id, envelope, body, queue=queue, time_limit=limit)
        message = json.loads(raw)
        tags.add(message["properties"].pop("delivery_tag"))
        message["properties"]["delivery_tag"] = "-"
        message["body"] = json.loads(message["body"])
        expected = _made_by_celery(app, task_id, envelope, body, queue or "celery", limit)
        assert message == expected
    assert len(tags) == 2  # a fresh delivery tag per message


def test_templates_are_kept_per_route_queue_and_limit() -> None:
    templates = MessageTemplates(_celery(), TASK_NAME, "celery")
    for route in ("POST /a", "POST /b"):
        for queue in (None, "q"):
            templates.build("i", {"route": route}, b"", queue=queue)
            templates.build("i", {"route": route}, b"", queue=queue)
    assert len(templates._made) == 4
