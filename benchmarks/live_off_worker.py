"""The example's worker with the live relay switched off: every replay's response is collected
whole, as before live results existed. The benchmark's "without the relay" contender, run in
the same round as the example's own worker; not a setting the library offers."""

from __future__ import annotations

from typing import Any

from async_task_middleware._worker import replay as _replay
from examples.wordcount.worker import celery_app

__all__ = ["celery_app"]

_call = _replay._call


async def _without_relay(app: Any, scope: Any, body: bytes, limit: int, live: Any) -> bytes:
    return await _call(app, scope, body, limit, None)


_replay._call = _without_relay
