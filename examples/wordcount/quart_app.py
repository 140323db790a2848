"""Word count on Quart: any ASGI app is wrapped the same way, the middleware around the app.

Quart's own middleware is WSGI-style, so the wrap is the generic ASGI one: the app's
cross-cutting concerns (here CORS, from Starlette) go *outside* the middleware, so that they run
on submissions and status URLs alike. Register the object the middleware wraps (``quart_app``)
in the worker, or the one the server serves (``app``): either works.
"""

from quart import Quart, jsonify, request
from starlette.middleware.cors import CORSMiddleware

from async_task_middleware import AsyncTaskMiddleware
from examples.wordcount.counting import word_count
from examples.wordcount.worker import CORS, PROTECTION, celery_app

quart_app = Quart(__name__)


@quart_app.post("/words")
async def count_words():  # type: ignore[no-untyped-def]
    files = await request.files
    text = files.get("text")
    if text is None:
        return jsonify({"detail": "a file field 'text' is required"}), 422
    return jsonify({"count": word_count(text.read().decode())})


@quart_app.get("/health")
async def health():  # type: ignore[no-untyped-def]
    return jsonify({"ok": True})


app = CORSMiddleware(
    AsyncTaskMiddleware(
        quart_app,
        celery_app=celery_app,
        routes=["POST /words"],
        name="wordcount-quart",
        **PROTECTION,
    ),
    **CORS,
)
