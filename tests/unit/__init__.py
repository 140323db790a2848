"""One part at a time, no worker: tables, formats, the store's lane against a Redis of its own.
Runs alone in seconds: ``pytest tests/unit``."""
