"""The protocol in process: the app called through ASGI (raw calls for the edges, httpx's
``ASGITransport`` on each framework), with a real Redis and a real Celery worker behind it."""
