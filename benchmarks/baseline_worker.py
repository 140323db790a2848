"""The hand-written baseline's Celery app and its plain task: ``celery -A
benchmarks.baseline_worker worker`` consumes the ``baseline`` queue."""

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

celery_app = Celery("baseline", broker=REDIS_URL, backend=REDIS_URL)
celery_app.conf.update(task_default_queue="baseline", worker_prefetch_multiplier=1)


@celery_app.task(name="baseline.count_words")
def count_words(text: str) -> int:
    return len(text.split())


@celery_app.task(
    name="baseline.count_words_durable",
    acks_late=True,
    reject_on_worker_lost=True,
)
def count_words_durable(text: str) -> int:
    """The same count with the replay's delivery settings: a fair measure of its overhead."""
    return len(text.split())
