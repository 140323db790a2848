"""Word count on Starlette: plain endpoints; the middleware makes ``POST /words`` long-running.

``middleware=[...]`` runs outermost first: ``AsyncTaskMiddleware`` comes last, so that the
app's own middleware (here CORS) runs in front of it, on submissions and status URLs.
"""

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from async_task_middleware import AsyncTaskMiddleware
from examples.wordcount.counting import word_count
from examples.wordcount.worker import CORS, PROTECTION, celery_app, frozen_heap


async def count_words(request: Request) -> JSONResponse:
    async with request.form() as form:
        text = form.get("text")
        if not isinstance(text, UploadFile):
            return JSONResponse({"detail": "a file field 'text' is required"}, status_code=422)
        content = (await text.read()).decode()
    return JSONResponse({"count": word_count(content)})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/words", count_words, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ],
    lifespan=frozen_heap,
    middleware=[
        Middleware(
            CORSMiddleware,
            **CORS,
        ),
        Middleware(
            AsyncTaskMiddleware,
            celery_app=celery_app,
            routes=["POST /words"],
            name="wordcount-starlette",
            **PROTECTION,
        ),
    ],
)
