"""The owner's collection (``tasks_path``): their tasks, newest first, a page at a time.

Every task an owner submits goes into a sorted set of theirs (``<p>tasks-<hash>``, scored by
submission time) in the submit script; ``LIST`` reads one page of it and each task's state where
it lies, in one call, whatever the owner holds: nothing to scan, nothing that drifts. The
cursor is the last task seen (its score and id), signed with a key derived from ``secret_key``
and bound to the owner and the filters, so that it can be neither forged nor used by another.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from redis.commands.core import AsyncScript

from .._shared.binding import Binding
from .._shared.routes import Route
from .._shared.types import Scope, Send
from .._shared.wire import status_of
from .responses import Problem, send_json, send_problem
from .settings import Settings, authorized, location
from .state import Listed, Page, StoreUnavailable

if TYPE_CHECKING:
    from .store import TaskStore

#: The most tasks one page may ask for, and how many it gets when it does not say.
MAX_LIMIT, DEFAULT_LIMIT = 500, 50
STATUSES = frozenset({"queued", "running", "retrying", "done", "failed"})


class BadCursor(ValueError):
    pass


async def read_page(
    script: AsyncScript, binding: Binding, owner: str, page: Page
) -> tuple[list[Listed], tuple[str, str] | None]:
    """The tasks of one page, and the cursor (score, task id) of the next, None at the end."""
    args: list[bytes | str | int] = [
        binding.record_prefix,
        binding.meta_prefix,
        page.after[0] if page.after else "+inf",
        page.after[1] if page.after else "",
        page.limit,
        max(4 * page.limit, 200),  # entries looked at: filters may skip most of them
        page.route or "",
        " ".join(sorted(page.statuses)),
    ]
    answer = await script(keys=[binding.collection_key(owner)], args=args)
    after = (answer[0].decode(), answer[1].decode()) if answer[0] else None
    items = [
        Listed(*(v.decode() for v in answer[i : i + 3]), *answer[i + 3 : i + 6])
        for i in range(2, len(answer), 6)
    ]
    return items, after


def sign_cursor(key: bytes, owner: str, page: Page, after: tuple[str, str]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(after).encode()).decode().rstrip("=")
    return f"{body}.{_mac(key, owner, page, body)}"


def open_cursor(key: bytes, owner: str, page: Page, cursor: str) -> tuple[str, str]:
    """The (score, task id) a cursor names; ``BadCursor`` when it was not made for this owner
    and these filters, or was altered."""
    body, _, mac = cursor.partition(".")
    if len(cursor) > 512 or not hmac.compare_digest(mac, _mac(key, owner, page, body)):
        raise BadCursor("the cursor is not one this server gave for this list")
    try:
        score, task_id = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        float(score)
    except (ValueError, TypeError, binascii.Error):
        raise BadCursor("the cursor is malformed") from None
    return str(score), str(task_id)


def _mac(key: bytes, owner: str, page: Page, body: str) -> str:
    bound = json.dumps([owner, page.route, sorted(page.statuses), body]).encode()
    return hmac.new(key, bound, hashlib.sha256).hexdigest()[:32]


def item(listed: Listed, decode_meta: Any, base: str) -> dict[str, Any]:
    """One task of the answer, from what ``LIST`` read."""
    record = json.loads(listed.record)
    meta = decode_meta(listed.meta) if listed.meta else {}
    result = meta.get("result") if isinstance(meta, dict) else None
    progress = result.get("progress") if isinstance(result, dict) else None
    http_status = status_of(listed.result) if listed.status == "done" else None
    ended = meta.get("date_done") if listed.status in ("done", "failed") else None
    created = record.get("created")
    if isinstance(created, int | float):
        created = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat()
    return {
        "task_id": listed.task_id,
        "location": base + str(record.get("path", "")),
        "route": record.get("route"),
        "status": listed.status,
        "created": created,
        "ended": ended,
        "http_status": http_status,
        "progress": progress if listed.status in ("running", "retrying", "queued") else None,
    }


async def collection(
    settings: Settings, default: Route, store: TaskStore, scope: Scope, send: Send
) -> None:
    """``GET`` (or ``HEAD``) on ``tasks_path``: one page of the caller's own tasks."""
    instance = scope["path"]
    method = scope["method"]
    head = method == "HEAD"
    if method not in ("GET", "HEAD"):
        await send_problem(send, Problem.METHOD_NOT_ALLOWED, instance, headers=[(b"allow", _ALLOW)])
        return
    if not await authorized(default, scope):
        await send_problem(send, Problem.UNAUTHORIZED, instance, head=head)
        return
    tags = settings.owner_tags(scope)
    if not tags or settings.keys is None:
        # Anonymous tasks are bearer capabilities: never listed, and no list to find.
        await send_problem(send, Problem.NOT_FOUND, instance, head=head)
        return
    owner, key = tags[0], settings.keys.derived(b"cursor")
    try:
        page, cursor = _page(scope.get("query_string", b""))
        if cursor is not None:
            page = dataclasses.replace(page, after=open_cursor(key, owner, page, cursor))
    except (BadCursor, ValueError) as exc:
        await send_problem(send, Problem.BAD_REQUEST, instance, detail=str(exc), head=head)
        return
    try:
        listed, after = await store.list_tasks(owner, page)
    except StoreUnavailable:
        retry = [(b"retry-after", b"%d" % settings.retry_after)]
        await send_problem(send, Problem.UNAVAILABLE, instance, headers=retry, head=head)
        return
    tasks = [item(one, store.decode_meta, location(settings, scope, "").decode()) for one in listed]
    headers = [(b"cache-control", b"no-store")]
    body: dict[str, Any] = {"tasks": tasks, "next": None}
    if after is not None:
        token = sign_cursor(key, owner, page, after)
        query = [("status", s) for s in sorted(page.statuses)]
        query += [("route", page.route)] if page.route else []
        query += [("limit", str(page.limit)), ("cursor", token)]
        body["next"] = token
        link = f'<{instance}?{urlencode(query)}>; rel="next"'
        headers.append((b"link", link.encode("latin-1")))
    await send_json(send, 200, body, headers, head=head)


_ALLOW = b"GET, HEAD"


def _page(query: bytes) -> tuple[Page, str | None]:
    """What the query asks for; ``ValueError`` (its text the 400's detail) when it is not one
    this list answers."""
    try:
        pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ValueError("the query must be ASCII (percent-encoded)") from None
    statuses: set[str] = set()
    route = cursor = None
    limit = DEFAULT_LIMIT
    for name, value in pairs:
        if name == "status":
            if value not in STATUSES:
                raise ValueError(f"status is one of {', '.join(sorted(STATUSES))}")
            statuses.add(value)
        elif name == "route":
            if not value or len(value) > 300 or not value.isprintable():
                raise ValueError("route is a marked route, e.g. 'POST /words'")
            route = value
        elif name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
                raise ValueError(f"limit is a whole number from 1 to {MAX_LIMIT}")
            limit = int(value)
        elif name == "cursor":
            cursor = value
    return Page(limit=limit, route=route, statuses=frozenset(statuses)), cursor
