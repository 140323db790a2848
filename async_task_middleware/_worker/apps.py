"""The apps one worker serves, by the name each app's middleware was given."""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator, Mapping

from .._shared.errors import ConfigurationError
from .._shared.types import ASGIApp


class Apps:
    """The apps one worker serves, by name, imported on first use."""

    def __init__(self, apps: Mapping[str, ASGIApp | str]) -> None:
        self._specs = dict(apps)
        self._resolved: dict[str, ASGIApp] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ASGIApp:
        with self._lock:
            app = self._resolved.get(name)
            if app is None:
                spec = self._specs.get(name)
                if spec is None:
                    raise LookupError(f"no app named {name!r} is registered in this worker")
                app = _import(spec) if isinstance(spec, str) else spec
                self._resolved[name] = app
            return app


def _import(spec: str) -> ASGIApp:
    module, sep, attribute = spec.partition(":")
    if not sep:
        raise ConfigurationError(f"app {spec!r} is not of the form 'package.module:attribute'")
    with worker_logging_kept():
        app: ASGIApp = getattr(importlib.import_module(module), attribute)
    return app


@contextlib.contextmanager
def worker_logging_kept() -> Iterator[None]:
    """Undo what an app does to the worker's logging as it loads or starts up.

    An app configures logging for a server of its own: Litestar replaces the root logger's
    handlers with its queue handler, and a ``dictConfig`` disables every logger it does not
    name. In a worker, the root's handlers are Celery's, which write the worker's log (in a
    prefork child, through the redirected standard streams); replaced, every later line of
    that process (the replays' "started" and "finished", Celery's "succeeded", the
    endpoint's own) goes nowhere. So the root's handlers and level come back, and the
    loggers that were on stay on; the app keeps the handlers it gave its own loggers.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = logging.Logger.manager.loggerDict.values()
    enabled = [lg for lg in loggers if isinstance(lg, logging.Logger) and not lg.disabled]
    try:
        yield
    finally:
        if root.handlers != handlers or root.level != level:
            root.handlers[:] = handlers
            root.setLevel(level)
        for lg in enabled:
            lg.disabled = False
