"""The worker side: what runs inside a Celery worker.

The replay task and its registration, the event loop replays run on, the replay pool, leases,
heartbeats and the sweep for lost messages. It imports ``_shared`` and never ``_web``.
"""
