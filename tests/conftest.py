"""Shared fixtures: one private redis-server and one real Celery worker for the session.

Nothing here depends on what an earlier run left: the Redis is new, on a free port, and keeps
nothing on disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager, LifespanNotSupported

from tests._servers import RedisServer, Worker, free_port

# The apps read REDIS_URL when they are imported; the port is fixed before any of them is.
_PORT = free_port()
os.environ["REDIS_URL"] = f"redis://127.0.0.1:{_PORT}/0"
# The core suite runs once with Redis as the broker and once with RabbitMQ
# (ATM_TEST_BROKER_URL=amqp://...); the result backend is always the private Redis.
os.environ["BROKER_URL"] = os.environ.get("ATM_TEST_BROKER_URL", "")
# One secret for the web side and the worker: owner hashes and sealed credential headers.
os.environ["ATM_SECRET_KEY"] = secrets.token_urlsafe(32)

LOCATION = re.compile(
    r"^(?P<path>.*)/(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})$"
)
FRAMEWORKS = ("fastapi", "starlette", "litestar", "quart", "django")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(logdir: Path) -> Iterator[RedisServer]:
    with RedisServer(logdir / "redis", port=_PORT) as server:
        yield server


@pytest.fixture(scope="session")
def worker(redis_server: RedisServer, logdir: Path) -> Iterator[Worker]:
    proc = Worker("tests.worker", {"REDIS_URL": redis_server.url}, logdir / "worker.log").start()
    yield proc
    proc.stop()


@contextlib.contextmanager
def private_worker(
    directory: Path, env: dict[str, str] | None = None, **options: Any
) -> Iterator[tuple[RedisServer, Worker]]:
    """A Redis of its own and a ``tests.worker`` serving only it (Redis as the broker too),
    its files in ``directory``; ``env`` and ``options`` (``pool``, ...) are the worker's."""
    directory.mkdir(parents=True, exist_ok=True)
    with RedisServer(directory / "redis") as server:
        worker_env = {"REDIS_URL": server.url, "BROKER_URL": "", **(env or {})}
        proc = Worker("tests.worker", worker_env, directory / "worker.log", **options).start()
        try:
            yield server, proc
        finally:
            proc.stop()


#: The test levels, one folder each; a test is marked with its folder's (``pytest -m unit``).
LEVELS = ("unit", "asgi", "e2e", "faults")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        level = item.path.parent.name
        if level in LEVELS:
            item.add_marker(level)


#: Debian's chromium, which ``scripts/dev.py test`` installs where it can.
CHROMIUM = shutil.which("chromium")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium, driven by Playwright; the test is skipped, saying why, without it."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH")
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own: no other test's worker takes anything from it."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


#: The keys the workers' sweep keeps for itself (run id, lock, live workers), not a task's.
SWEEP_KEYS = (
    b"async-task-middleware-redis-run",
    b"async-task-middleware-sweeping",
    b"async-task-middleware-workers",
)


def runs(server: RedisServer, key: str) -> int:
    """How many times the probe's ``/mark`` (or ``/die``) ran under ``key``."""
    return int(redis.Redis.from_url(server.url).get(key) or 0)


@pytest.fixture(scope="module")
def example_redis(logdir: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A Redis of the module's own, so that the example's worker is the only one serving it."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    with RedisServer(logdir / f"{module}-example-redis") as server:
        yield server


@pytest.fixture(scope="module")
def example_worker(
    example_redis: RedisServer, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Worker]:
    """The example's own worker command: ``celery -A examples.wordcount.worker worker``."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    env = {"REDIS_URL": example_redis.url}
    log = logdir / f"{module}-example-worker.log"
    proc = Worker("examples.wordcount.worker", env, log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def served_example(
    example_worker: Worker, example_redis: RedisServer, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The FastAPI example under uvicorn, with the example's worker and Redis: its base URL."""
    from tests._servers import Uvicorn

    module = request.module.__name__.rsplit(".", 1)[-1]
    env = {"REDIS_URL": example_redis.url}
    server = Uvicorn("examples.wordcount.fastapi_app:app", env, logdir / f"{module}-uvicorn.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=FRAMEWORKS)
def wordcount_app(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    module = __import__(f"examples.wordcount.{request.param}_app", fromlist=["app"])
    return module.app


# LifespanManager runs the app's lifespan; the client calls the app itself, not manager.app,
# which would hand every request one shared state dict (Litestar keeps per-request flags there).
@contextlib.asynccontextmanager
async def lifespan(app) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    """The app's lifespan, when it has one (Django's ASGI handler has none)."""
    manager = LifespanManager(app)
    try:
        await manager.__aenter__()
    except LifespanNotSupported:
        yield
        return
    try:
        yield
    finally:
        await manager.__aexit__(None, None, None)


@pytest.fixture
async def client(worker: Worker, wordcount_app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    async with lifespan(wordcount_app), make_client(wordcount_app) as c:
        yield c


@pytest.fixture
async def probe(worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    from tests.apps import probe_app

    async with LifespanManager(probe_app), make_client(probe_app) as c:
        yield c


def make_client(app, **transport) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **transport),
        base_url="http://testserver",
        follow_redirects=False,
        timeout=30,
    )


async def submit(client: httpx.AsyncClient, url: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """POST to a marked route; assert the 303 and return the status URL."""
    response = await client.post(url, **kwargs)
    assert response.status_code == 303, response.text
    assert response.content == b""
    location = response.headers["location"]
    assert LOCATION.match(location), location
    return location


async def final(
    client: httpx.AsyncClient,
    location: str,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
    through_503: bool = False,
) -> httpx.Response:
    """Poll the status URL (with ``headers``: an owner's credentials, say) until it is no
    longer 202; ``through_503``: a read the store did not answer in time is polled again, as
    its ``Retry-After`` asks (it says nothing of the task)."""
    with anyio.fail_after(timeout):
        while True:
            response = await client.get(location, headers=headers)
            if response.status_code == 503 and through_503:
                await anyio.sleep(0.05)
                continue
            if response.status_code != 202:
                return response
            assert int(response.headers["retry-after"]) >= 1
            await anyio.sleep(0.05)
