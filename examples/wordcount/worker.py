"""The Celery app and the one worker for all three word-count apps.

    celery -A examples.wordcount.worker worker

``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) is the result backend and, unless
``BROKER_URL`` names another one (``amqp://guest:guest@127.0.0.1:5672//``), the broker.
"""

import os

from celery import Celery

from async_task_middleware import register_replay

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

celery_app = Celery(
    "wordcount",
    broker=os.environ.get("BROKER_URL") or REDIS_URL,
    backend=REDIS_URL,
)
celery_app.conf.update(
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # With RabbitMQ, a 303 only for a task the broker confirmed; Redis ignores the option.
    broker_transport_options={"confirm_publish": True},
    worker_prefetch_multiplier=1,
)

# The apps are imported in the worker on first use, by name, so that they can import
# celery_app from here without a cycle.
register_replay(
    celery_app,
    {
        "wordcount-fastapi": "examples.wordcount.fastapi_app:app",
        "wordcount-starlette": "examples.wordcount.starlette_app:app",
        "wordcount-litestar": "examples.wordcount.litestar_app:app",
    },
)
