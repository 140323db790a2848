"""Webhook deliveries: one Celery task per event, signed, sent to the pinned address, retried.

Each attempt signs the event anew (Standard Webhooks: ``webhook-id``, ``webhook-timestamp``,
``webhook-signature``, one ``v1,`` signature per current secret) and posts it to the address the
web side resolved and checked, with the URL's host in ``Host`` and in TLS's SNI: no second
lookup, so a name that resolves elsewhere later (DNS rebinding) changes nothing. Redirects are
not followed and at most 64 KiB of an answer is read. A 2xx delivers it; ``410 Gone`` stops it;
anything else, a timeout or a network error is retried from the broker (``retry(countdown=)``,
so a waiting delivery holds no worker) on the schedule, then given up.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, Task

from .._shared.binding import Binding
from .._shared.deployment import again
from .._shared.errors import ConfigurationError
from .._shared.metrics import webhook_attempted
from .._shared.webhooks import DEFAULT_PORTS, DELIVER_TASK, Webhooks, backoff

logger = logging.getLogger(__name__)

_MAX_ANSWER = 64 * 1024


def register_delivery(celery_app: Celery, binding: Binding, webhooks: Webhooks) -> Task:
    """The delivery task on ``celery_app``, consumed from ``webhooks.queue`` by every worker
    that registered the replay."""
    try:
        import httpx
        import standardwebhooks
    except ImportError:
        raise ConfigurationError(
            'webhooks need the webhooks extra: pip install "async-task-middleware[webhooks]"'
        ) from None
    if not webhooks.secrets:
        raise ConfigurationError("register_replay(webhooks=...) needs Webhooks(secret=...)")
    signers = [standardwebhooks.Webhook(key) for key in webhooks.secrets]

    def attempt(event: dict[str, Any]) -> int | None:
        """One attempt: the receiver's status, None when it could not be reached in time."""
        url = urlsplit(event["url"])
        address = event["address"]
        port = url.port or DEFAULT_PORTS[url.scheme]
        pinned = f"[{address}]" if ":" in address else address
        target = url._replace(netloc=f"{pinned}:{port}").geturl()
        body = event["payload"].encode()
        now = datetime.datetime.now(datetime.UTC)
        signature = " ".join(s.sign(event["id"], now, body) for s in signers)
        headers = {
            "host": url.netloc,
            "content-type": "application/json",
            "user-agent": "async-task-middleware-webhooks",
            "webhook-id": event["id"],
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        deadline = time.monotonic() + webhooks.timeout
        try:
            with (
                httpx.Client(timeout=webhooks.timeout, trust_env=False) as http,
                http.stream(
                    "POST",
                    target,
                    content=body,
                    headers=headers,
                    follow_redirects=False,
                    extensions={"sni_hostname": url.hostname},
                ) as answer,
            ):
                read = 0
                for piece in answer.iter_raw():
                    read += len(piece)
                    if read >= _MAX_ANSWER or time.monotonic() > deadline:
                        break
                return answer.status_code
        except httpx.HTTPError as exc:
            logger.info("webhook %s: attempt failed: %s", event["id"], type(exc).__name__)
            return None

    def record(event: dict[str, Any], state: str, attempts: int, status: int | None) -> None:
        """The delivery's state beside the task, for its owner's status reads."""
        webhook_attempted(str(event.get("kind")), state.replace(" ", "_"))
        if "task_id" not in event:
            return
        note = json.dumps(
            {"event": event.get("kind"), "state": state, "attempts": attempts, "status": status}
        )
        key = binding.webhook_key(event["task_id"])
        store = celery_app.backend.client
        again(lambda: store.set(key, note, ex=binding.expires), "storing a webhook's state")

    def deliver(task: Task, event: dict[str, Any]) -> str:
        status = attempt(event)
        retries = task.request.retries
        if status is not None and 200 <= status < 300:
            logger.info("webhook %s delivered: %d, attempt %d", event["id"], status, retries + 1)
            record(event, "delivered", retries + 1, status)
            return "delivered"
        if status == 410:
            logger.info("webhook %s stopped: the receiver answered 410 Gone", event["id"])
            record(event, "stopped", retries + 1, status)
            return "stopped"
        delay = backoff(webhooks.schedule, retries)
        if delay is None:
            logger.warning("webhook %s given up after %d attempts", event["id"], retries + 1)
            record(event, "given up", retries + 1, status)
            return "given up"
        logger.info(
            "webhook %s: attempt %d answered %s; again in %.0f s",
            *(event["id"], retries + 1, status, delay),
        )
        record(event, "retrying", retries + 1, status)
        raise task.retry(countdown=delay)

    delivery: Task = celery_app.task(
        name=DELIVER_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=None,
        serializer="json",
        shared=False,
    )(deliver)
    return delivery
