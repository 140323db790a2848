"""The status URL: ``GET``/``HEAD`` read a task, ``DELETE`` cancels it, for its owner only.

A task owned by someone else, an unknown one and a malformed id get the very same 404: the
status URL reveals nothing to whoever does not own the task.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from ._responses import send_json, send_problem, send_response
from ._routes import STATUS_METHODS, Status
from ._scripts import FAILED
from ._settings import Settings, authorized
from ._store import StoreUnavailable, TaskState, TaskStore
from ._types import Scope, Send
from ._wire import WireFormatError, unpack_response

logger = logging.getLogger(__name__)

_FAILED = frozenset({"FAILURE", "REVOKED", "REJECTED"})
_ALLOW = ", ".join(STATUS_METHODS).encode()


def may_see(record: dict[str, Any], tags: list[str]) -> bool:
    """An anonymous task is anyone's (its status URL is the capability); an owned one only
    its owner's, under any of the configured keys."""
    owner = record.get("owner")
    if owner is None:
        return True
    return any(hmac.compare_digest(str(owner), tag) for tag in tags)


async def status(
    settings: Settings, store: TaskStore, scope: Scope, send: Send, target: Status
) -> None:
    method = scope["method"]
    head = method == "HEAD"
    instance = target.instance
    if method not in STATUS_METHODS:
        await send_problem(send, 405, instance, headers=[(b"allow", _ALLOW)])
        return
    if not await authorized(target.route, scope):
        await send_problem(send, 401, instance, head=head)
        return
    if target.task_id is None:
        await send_problem(send, 404, instance, head=head)
        return
    tags = settings.owner_tags(scope)
    try:
        if method == "DELETE":
            if await store.delete(target.task_id, tags):
                await send_response(send, 204, [], b"")
            else:
                await send_problem(send, 404, instance)
            return
        state = await store.read(target.task_id)
    except StoreUnavailable as exc:
        logger.warning("task store unavailable: %s", exc)
        retry_after = [(b"retry-after", settings.retry_after)]
        await send_problem(send, 503, instance, headers=retry_after, head=head)
        return
    if state.record is None or not may_see(state.record, tags):
        await send_problem(send, 404, instance, head=head)
        return
    if state.outcome == FAILED:
        await _failed(settings, send, instance, state, head)
    elif state.outcome is not None:
        try:
            code, headers, body = unpack_response(state.outcome)
        except WireFormatError:
            logger.error("task %s: stored response unreadable", target.task_id)
            await send_problem(send, 500, instance, head=head)
            return
        await send_response(send, code, headers, body, head=head)
    elif state.meta is not None and state.meta.get("status") in _FAILED:
        await _failed(settings, send, instance, state, head)  # failed before it could begin
    else:
        result = state.meta.get("result") if state.meta else None
        progress = result.get("progress") if isinstance(result, dict) else None
        await send_json(
            send,
            202,
            {
                "task_id": target.task_id,
                "status": "running" if state.live else "retrying" if state.began else "queued",
                "progress": progress,
            },
            [(b"retry-after", settings.retry_after), (b"cache-control", b"no-store")],
            head=head,
        )


async def _failed(
    settings: Settings, send: Send, instance: str, state: TaskState, head: bool
) -> None:
    detail = _failure_detail(state.meta or {}) if settings.debug else None
    await send_problem(send, 500, instance, detail=detail, head=head)


def _failure_detail(meta: dict[str, Any]) -> str:
    result = meta.get("result")
    if isinstance(result, dict):
        return f"{result.get('exc_type', 'Error')}: {result.get('exc_message', '')}"
    return str(meta.get("status"))
