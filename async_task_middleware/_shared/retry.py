"""A route's retries: which failures of a replay run it again, and when.

The policy travels in the task message (as the route's time limit does), so that one worker
serves routes with different policies; exceptions are matched there by name, against the
raised exception's classes, so the worker imports nothing the web side named.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Retry:
    """Retries of a route's transient failures, e.g. ``Route(retries=Retry(attempts=3,
    on=(ConnectionError, TimeoutError), on_status=(502, 503, 504)))``.

    A replay that raises one of ``on`` (or a subclass), or whose endpoint answers one of
    ``on_status``, runs again after the backoff, counted on the broker (Celery's
    ``retry(countdown=)``), not in a sleeping worker; meanwhile the task's status is
    ``"retrying"``, with the attempt and the time of the next. The last attempt's outcome is
    the task's. Time limits count per attempt; a worker's death is counted apart
    (``max_attempts``).

    Args:
        attempts: Attempts in all, the first included (at least 2 to retry at all).
        on: Exception classes (or their qualified names, ``"httpx.ConnectError"``) to retry.
        on_status: Response statuses to retry (an endpoint's own 502, 503, 504...).
        backoff: Seconds before the first retry; each next one waits twice as long.
        max_backoff: The longest wait between two attempts, in seconds.
        jitter: Wait a random time up to the backoff instead (full jitter), so that tasks
            that failed together do not all come back together.
    """

    attempts: int = 3
    on: Sequence[type[BaseException] | str] = ()
    on_status: Sequence[int] = ()
    backoff: float = 2.0
    max_backoff: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool):
            raise ValueError(f"Retry(attempts={self.attempts!r}): a whole number")
        if not 1 <= self.attempts <= 100:
            raise ValueError(f"Retry(attempts={self.attempts!r}): from 1 to 100")
        if isinstance(self.on, str | type):
            raise ValueError("Retry(on=...): a list of exception classes or names")
        for kind in self.on:
            named = isinstance(kind, str) and kind.replace(".", "").replace("_", "").isalnum()
            if not named and not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ValueError(f"Retry(on=...): {kind!r} is not an exception class or name")
        for status in self.on_status:
            if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
                raise ValueError(f"Retry(on_status=...): {status!r} is not an HTTP status")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Retry({name}={value!r}): seconds, not below 0")

    def longest(self) -> float:
        """Seconds of backoff in the whole schedule, at most."""
        return float(
            sum(min(self.backoff * 2**n, self.max_backoff) for n in range(self.attempts - 1))
        )

    def wire(self) -> dict[str, Any]:
        """The policy as the task message carries it."""
        return {
            "attempts": self.attempts,
            "on": [
                k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}" for k in self.on
            ],
            "on_status": list(self.on_status),
            "backoff": self.backoff,
            "max_backoff": self.max_backoff,
            "jitter": self.jitter,
        }


def retry_delay(policy: dict[str, Any], retry: int) -> float:
    """Seconds before retry number ``retry`` (0: the first)."""
    wait = min(float(policy["backoff"]) * 2**retry, float(policy["max_backoff"]))
    return random.uniform(0, wait) if policy.get("jitter") else wait


def matches(policy: dict[str, Any], exc: BaseException | None, status: int | None) -> bool:
    """Whether the policy retries this outcome: ``exc`` raised, or ``status`` answered."""
    if exc is not None:
        names = set(policy.get("on", ()))
        return any(_names(kind) & names for kind in type(exc).__mro__)
    return status is not None and status in policy.get("on_status", ())


def _names(kind: type) -> set[str]:
    # builtins.ConnectionError is named either way
    full = f"{kind.__module__}.{kind.__qualname__}"
    return {full, kind.__qualname__} if kind.__module__ == "builtins" else {full}


def policy_of(envelope: dict[str, Any]) -> dict[str, Any] | None:
    policy = envelope.get("retries")
    return policy if isinstance(policy, dict) and isinstance(policy.get("attempts"), int) else None


def schedule_fits(policies: Iterable[tuple[Retry, float | None]], lifetime: int) -> str | None:
    """Why a route's schedule outlives the record (``result_expires``), None when none does."""
    for policy, time_limit in policies:
        total = policy.longest() + policy.attempts * (time_limit or 0)
        if total >= lifetime:
            return (
                f"Retry(...) waits and runs up to {total:.0f} s in all, not below the record's "
                f"lifetime (result_expires, {lifetime} s): the task would be forgotten first"
            )
    return None
