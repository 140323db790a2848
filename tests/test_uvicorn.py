"""The word count as a user runs it: uvicorn, a Celery worker and Redis, all real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._servers import RedisServer, Uvicorn, Worker
from tests.conftest import FRAMEWORKS, LOCATION, final

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def example_redis(logdir: Path) -> Iterator[RedisServer]:
    """A Redis of its own, so that the example's worker is the only one serving it."""
    with RedisServer(logdir / "example-redis") as server:
        yield server


@pytest.fixture(scope="module")
def example_worker(example_redis: RedisServer, logdir: Path) -> Iterator[Worker]:
    """The example's own worker command: ``celery -A examples.wordcount.worker worker``."""
    env = {"REDIS_URL": example_redis.url}
    proc = Worker("examples.wordcount.worker", env, logdir / "example-worker.log").start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("root_path", ["", "/base"])
async def test_word_count_over_http(
    framework: str,
    root_path: str,
    example_worker: Worker,
    example_redis: RedisServer,
    logdir: Path,
) -> None:
    extra = ("--root-path", root_path) if root_path else ()
    server = Uvicorn(
        f"examples.wordcount.{framework}_app:app",
        {"REDIS_URL": example_redis.url},
        logdir / f"uvicorn-{framework}.log",
        *extra,
    ).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.post(
                "/words", files={"text": ("seed.txt", b"the quick brown fox")}
            )
            assert response.status_code == 303
            location = response.headers["location"]
            match = LOCATION.match(location)
            assert match
            assert match["path"] == f"{root_path}/words"
            # The client follows the Location as given; the proxy in front strips root_path.
            path = location.removeprefix(root_path)
            done = await final(client, path)
            assert done.status_code == 200
            assert done.json() == {"count": 4}
            assert (await client.get("/health")).json() == {"ok": True}
            assert (await client.delete(path)).status_code == 204
            assert (await client.get(path)).status_code == 404
    finally:
        server.stop()
