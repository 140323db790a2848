"""Word count on Litestar: plain handlers; the middleware makes ``POST /words`` long-running.

Litestar runs app-level middleware only for requests that match one of its routes, so the
status URLs (``/words/{id}``) would never reach it: the middleware wraps the whole app instead,
and a generic ASGI CORS middleware wraps that, so that it answers on status URLs too. Auth that
Litestar runs itself (guards, its authentication middleware) runs only in the worker: give the
middleware an ``authorize=`` hook to check credentials before anything is enqueued.
"""

from dataclasses import dataclass
from typing import Annotated

from litestar import Litestar, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body
from starlette.middleware.cors import CORSMiddleware

from async_task_middleware import AsyncTaskMiddleware, document_tasks
from examples.wordcount.counting import word_count
from examples.wordcount.worker import CORS, PROTECTION, celery_app


@dataclass
class Words:
    text: UploadFile


@post("/words", status_code=200)
async def count_words(
    data: Annotated[Words, Body(media_type=RequestEncodingType.MULTI_PART)],
) -> dict[str, int]:
    content = (await data.text.read()).decode()
    return {"count": word_count(content)}


@get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


litestar_app = Litestar(route_handlers=[count_words, health])
# /schema shows the protocol: the 303, the status path with its 202 and result, the DELETE.
document_tasks(litestar_app, ["POST /words"], tasks_path="/tasks")

app = CORSMiddleware(
    AsyncTaskMiddleware(
        litestar_app,
        celery_app=celery_app,
        routes=["POST /words"],
        name="wordcount-litestar",
        **PROTECTION,
    ),
    **CORS,
)
