"""The web side: what runs in the ASGI process in front of the app.

The middleware, the submission and the status URL's answers, and the task store that reads and
writes Redis for them. It imports ``_shared`` and never ``_worker``.
"""
