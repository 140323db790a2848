"""The task message for the native Redis publish, filled in from a template made once.

What the submit script pushes is the message kombu's Redis transport would push for
``send_task``: Celery's ``as_task_v2`` makes the task message, and the wrapping mirrors kombu's
virtual channel (``prepare_message`` + ``_inplace_augment_message``); a stock worker reads it
back. For one route, queue and time limit, all of it is the same on every submission but the
task id, the delivery tag and the request. So Celery makes the message once, with markers in
those places, and a submission only writes its three parts between the fixed pieces: no
``as_task_v2``, no dictionaries, one ``json.dumps`` (of the request) per submission.

The message body is the task's JSON as it is, not base64 again (kombu reads a body without
``body_encoding`` as text), and the request body's base64 is written once, straight into the
message where a marker held its place.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from typing import Any

from celery import Celery

from .wire import body_base64

_ID, _TAG, _REQUEST = range(3)


class _Template:
    def __init__(self, pieces: list[bytes | int]) -> None:
        self.pieces = pieces
        # Random, and never sent anywhere: no request can contain it by chance or design.
        self.marker = secrets.token_hex(16)

    def fill(self, task_id: str, envelope: dict[str, Any], body: bytes | bytearray) -> bytearray:
        marker = self.marker
        # Twice JSON, as the message carries it: the task's body is a JSON string in the
        # message's JSON.
        request = json.dumps(json.dumps({**envelope, "body": marker}))[1:-1]
        head, tail = request.split(marker)
        out = bytearray()
        for piece in self.pieces:
            if piece == _ID:
                out += task_id.encode()
            elif piece == _TAG:
                out += str(uuid.uuid4()).encode()
            elif piece == _REQUEST:
                out += head.encode()
                body_base64(body, into=out)
                out += tail.encode()
            else:
                assert isinstance(piece, bytes)
                out += piece
        return out


class MessageTemplates:
    """The messages of one Celery app, made by Celery on first use per route, queue and time
    limit (the key set is as small as the routes are few)."""

    def __init__(self, celery_app: Celery, task_name: str, default_queue: str) -> None:
        self._celery_app = celery_app
        self._task_name = task_name
        self._default_queue = default_queue
        self._made: dict[tuple[str, str, float | None], _Template] = {}

    def build(
        self,
        task_id: str,
        envelope: dict[str, Any],
        body: bytes | bytearray,
        *,
        queue: str | None = None,
        time_limit: float | None = None,
    ) -> bytearray:
        """The message for ``task_id``, carrying the request ``envelope`` + ``body``;
        ``time_limit``: Celery's hard limit in the message, None for the worker's own."""
        key = (str(envelope.get("route", "")), queue or self._default_queue, time_limit)
        template = self._made.get(key)
        if template is None:
            template = self._made[key] = self._make(*key)
        return template.fill(task_id, envelope, body)

    def _make(self, route: str, queue: str, time_limit: float | None) -> _Template:
        marks = {str(uuid.uuid4()): _ID, str(uuid.uuid4()): _TAG}
        task_id, tag = marks
        request = uuid.uuid4().hex
        task = self._celery_app.amqp.as_task_v2(
            task_id,
            self._task_name,
            args=(request,),
            kwargs={},
            # What Flower and the worker's log show: the route, never the body.
            argsrepr=repr((route,)),
            kwargsrepr="{}",
            time_limit=time_limit,
            # The worker writes Celery's result meta itself, with the outcome (``FINISH``).
            ignore_result=True,
        )
        properties = dict(task.properties)
        properties.update(
            delivery_mode=2,
            delivery_info={"exchange": "", "routing_key": queue},
            priority=0,
            delivery_tag=tag,
        )
        message = {
            # The task's body is plain JSON (strings and lists): json.dumps writes what
            # kombu's JSON serializer would.
            "body": json.dumps(task.body),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": task.headers,
            "properties": properties,
        }
        # The request is a string in the task's body, so a string in a string in the message.
        marks[json.dumps(json.dumps(request))[1:-1]] = _REQUEST
        text = json.dumps(message)
        parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", text)
        pieces: list[bytes | int] = [marks.get(part, part.encode()) for part in parts if part]
        if pieces.count(_REQUEST) != 1 or _ID not in pieces or _TAG not in pieces:
            raise RuntimeError("Celery's task message has an unknown shape")
        return _Template(pieces)
