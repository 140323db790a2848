"""The error every module may raise at start, kept apart so that any of them can import it."""


class ConfigurationError(ValueError):
    """A setting of the middleware or of the Celery app that the protocol cannot work with."""
