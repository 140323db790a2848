"""What the task store deals in: a submission's facts, the submit script's decision, and a
status read's state, from which the answers are made."""

from __future__ import annotations

import datetime
import enum
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._shared.scripts import FAILED


class StoreUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


class Outcome(enum.IntEnum):
    """What the submit script decided."""

    ACCEPTED = 1
    REFUSED = 0  # past its deadline, or a tombstone: this id was already answered 503
    OWNER_FULL = -1
    QUEUE_FULL = -2
    DUPLICATE = 2  # the idempotency key's earlier task, for the same request
    CONFLICT = 3  # the idempotency key with another request


@dataclass(frozen=True, slots=True)
class Submission:
    """One submission's facts for the script: who, which route, and the caps that apply."""

    task_id: str
    app: str
    route: str
    owner: str | None
    owner_cap: int | None
    queued_cap: int | None
    queue: str | None = None
    idempotency_key: bytes | None = None  # the Redis key, not the client's
    fingerprint: str = ""
    webhook: dict[str, Any] | None = None  # kept in the record, for a DELETE's event
    path: str = ""  # the status path, kept in the record for the owner's collection
    listed: bool = False  # added to the owner's collection


_FAILED_STATES = frozenset({"FAILURE", "REVOKED", "REJECTED"})


@dataclass(frozen=True)
class TaskState:
    """A status read: the record (None: unknown), the outcome (a packed response or
    ``_shared.scripts.FAILED``), Celery's meta (progress, failure details; decoded only when asked
    for, which a finished task's poll never does), and whether a worker runs the task now
    (``live``) or ran it before (``began``: no heartbeat now means it waits to be delivered
    again)."""

    record: dict[str, Any] | None
    outcome: bytes | None = None
    raw_meta: bytes | None = None
    live: bool = False
    began: bool = False
    decode: Callable[[bytes], dict[str, Any]] = field(default=json.loads, repr=False)
    #: The webhook's last delivery, as the delivery task wrote it (JSON), None before one.
    raw_hook: bytes | None = None

    #: The note of a retry under way (``_worker.job``: the next attempt, of how many, when).
    raw_retry: bytes | None = None

    #: The head of a response being streamed (``_worker.live``), None when none has begun.
    raw_head: bytes | None = None

    @functools.cached_property
    def head(self) -> Head | None:
        """The streamed response's head, while it is produced (not once the task ended)."""
        if self.raw_head is None or self.final:
            return None
        return Head.parse(self.raw_head)

    @functools.cached_property
    def webhook(self) -> dict[str, Any] | None:
        return None if self.raw_hook is None else json.loads(self.raw_hook)

    @functools.cached_property
    def meta(self) -> dict[str, Any] | None:
        return None if self.raw_meta is None else self.decode(self.raw_meta)

    @property
    def _meta_failed(self) -> bool:
        """Celery's meta says the task failed (stored before, or instead of, an outcome)."""
        return self.meta is not None and self.meta.get("status") in _FAILED_STATES

    @property
    def final(self) -> bool:
        """Unknown (gone), or ended: nothing more to wait for."""
        return self.record is None or self.outcome is not None or self._meta_failed

    def summary(self, task_id: str) -> dict[str, Any]:
        """The 202 body (and the event stream's status data): task id, status, progress."""
        result = self.meta.get("result") if self.meta else None
        progress = result.get("progress") if isinstance(result, dict) else None
        summary = {
            "task_id": task_id,
            "status": "running" if self.live else "retrying" if self.began else "queued",
            "progress": progress,
        }
        if self.head is not None:
            summary["produced"] = self.head.produced  # bytes of the streamed response so far
        if self.webhook is not None:
            summary["webhook"] = self.webhook
        if self.raw_retry is not None and summary["status"] == "retrying":
            note = json.loads(self.raw_retry)
            summary["attempt"] = note.get("attempt")
            summary["attempts"] = note.get("of")
            at = note.get("at")
            if isinstance(at, int | float):
                when = datetime.datetime.fromtimestamp(at, datetime.UTC)
                summary["next_attempt_at"] = when.isoformat()
        return summary

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED or (self.outcome is None and self._meta_failed)


@dataclass(frozen=True)
class Head:
    """A streamed response so far: its status and headers (as served), the bytes produced,
    whether it ended, the delivery that produces it, and the size it may reach."""

    status: int
    headers: list[tuple[bytes, bytes]]
    produced: int
    ended: bool
    attempt: int
    limit: int

    @classmethod
    def parse(cls, raw: bytes) -> Head | None:
        try:
            head = json.loads(raw)
            headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["headers"]]
            return cls(
                int(head["status"]),
                headers,
                int(head["produced"]),
                bool(head["ended"]),
                int(head["attempt"]),
                int(head["limit"]),
            )
        except (ValueError, TypeError, KeyError, UnicodeError):
            return None


@dataclass(frozen=True)
class Page:
    """What one page of an owner's collection asks for."""

    limit: int
    after: tuple[str, str] | None = None  # the cursor: (score, task id) of the last one seen
    route: str | None = None
    statuses: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Listed:
    """One task of a page, as ``LIST`` read it."""

    task_id: str
    score: str
    status: str
    record: bytes
    result: bytes  # the first bytes of its outcome ('' = none yet)
    meta: bytes  # Celery's meta ('' = none)
