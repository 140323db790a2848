"""The test suite's worker: the word-count apps and the probe apps, one Celery worker."""

import os

from celery import Celery

from async_task_middleware import register_replay

celery_app = Celery("tests", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
celery_app.conf.update(
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

register_replay(
    celery_app,
    {
        "wordcount-fastapi": "examples.wordcount.fastapi_app:app",
        "wordcount-starlette": "examples.wordcount.starlette_app:app",
        "wordcount-litestar": "examples.wordcount.litestar_app:app",
        "probe": "tests.apps:probe_app",
    },
)
