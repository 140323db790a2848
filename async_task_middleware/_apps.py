"""The apps one worker serves, by the name each app's middleware was given."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping

from ._errors import ConfigurationError
from ._types import ASGIApp


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
    app: ASGIApp = getattr(importlib.import_module(module), attribute)
    return app
