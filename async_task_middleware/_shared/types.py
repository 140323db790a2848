"""The ASGI types every module speaks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The scope key by which a worker's replay is recognised: only code can set it, never a client.
REPLAY_KEY = "async_task_middleware.replay"


class ReplayMark:
    """The value under ``REPLAY_KEY``: the middleware notes on it that the replay reached it
    (a scope may be copied on its way; this object is shared by every copy)."""

    __slots__ = ("reached",)

    def __init__(self) -> None:
        self.reached = False


#: The app each middleware wraps, by the middleware's ``name``, as built in this process: a
#: replay into that app never passes the middleware, and need not.
WRAPPED_APPS: dict[str, int] = {}
