"""Word count on FastAPI: plain endpoints; the middleware makes ``POST /words`` long-running.

Starlette runs the middleware added last first: ``AsyncTaskMiddleware`` is added first, so
that the app's own middleware (here CORS; authentication and rate limits alike) runs in front
of it, on submissions and status URLs.
"""

from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, StreamingResponse

from async_task_middleware import AsyncTaskMiddleware, document_tasks
from examples.wordcount.counting import running_count, word_count
from examples.wordcount.worker import CORS, PROTECTION, celery_app, frozen_heap

app = FastAPI(title="word count", lifespan=frozen_heap)


@app.post("/words")
async def count_words(text: Annotated[UploadFile, File()]) -> dict[str, int]:
    content = (await text.read()).decode()
    return {"count": word_count(content)}


@app.post("/tally")
async def tally(text: Annotated[UploadFile, File()]) -> StreamingResponse:
    """The running count, streamed as NDJSON: marked as long-running, it reaches a caller that
    waits (``Prefer: wait``) live, line by line, through the queue."""
    content = (await text.read()).decode()
    return StreamingResponse(running_count(content), media_type="application/x-ndjson")


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo() -> str:
    """The demo page: pick a file, watch the task's progress live, see the count, or cancel."""
    return (Path(__file__).parent / "demo.html").read_text()


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


# /docs shows the protocol: the 303, the status path with its 202 and result, the DELETE.
document_tasks(app, ["POST /words", "POST /tally"], tasks_path="/tasks")
app.add_middleware(
    AsyncTaskMiddleware,
    celery_app=celery_app,
    routes=["POST /words", "POST /tally"],
    name="wordcount-fastapi",
    **PROTECTION,
)
app.add_middleware(
    CORSMiddleware,
    **CORS,
)
