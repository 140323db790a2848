"""The word count under each server a user may run: uvicorn (uvloop and httptools, as in
production), hypercorn, granian, and gunicorn with two uvicorn worker processes sharing one
task store; one Redis and the example's own worker behind them all."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import httpx
import pytest

from tests._servers import RedisServer, Server, Worker, free_port
from tests.conftest import LOCATION, final

pytestmark = pytest.mark.anyio

APP = "examples.wordcount.fastapi_app:app"


UVICORN_PRODUCTION = ("--loop", "uvloop", "--http", "httptools", "--no-access-log")
GUNICORN_TWO = ("--workers", "2", "--worker-class", "uvicorn.workers.UvicornWorker")


def granian_address(port: int) -> tuple[str, ...]:
    return ("--host", "127.0.0.1", "--port", str(port))


def command(server: str, port: int) -> list[str]:
    python = [sys.executable, "-m"]
    address = f"127.0.0.1:{port}"
    return {
        "uvicorn": [*python, "uvicorn", APP, "--port", str(port), *UVICORN_PRODUCTION],
        "hypercorn": [*python, "hypercorn", APP, "--bind", address],
        "granian": [*python, "granian", "--interface", "asgi", APP, *granian_address(port)],
        "gunicorn -w 2": [*python, "gunicorn", APP, "--bind", address, *GUNICORN_TWO],
    }[server]


SERVERS = ("uvicorn", "hypercorn", "granian", "gunicorn -w 2")


@pytest.mark.parametrize("server", SERVERS)
async def test_the_protocol_under_each_server(
    server: str, example_worker: Worker, example_redis: RedisServer, logdir: Path
) -> None:
    port = free_port()
    env = {"REDIS_URL": example_redis.url}
    log = logdir / f"server-{server.split()[0]}.log"
    process = Server(command(server, port), port, env, log, server).start()
    try:
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as client:
            # Twenty at once: with two gunicorn workers, submissions and polls land on both,
            # and every status URL is answered by whichever process gets it.
            counts: dict[int, int] = {}

            async def one(n: int) -> None:
                response = await client.post("/words", files={"text": ("t.txt", b"w " * n)})
                assert response.status_code == 303, response.text
                location = response.headers["location"]
                assert LOCATION.match(location)
                done = await final(client, location)
                assert done.status_code == 200
                counts[n] = done.json()["count"]
                assert (await client.delete(location)).status_code == 204
                assert (await client.get(location)).status_code == 404

            async with anyio.create_task_group() as group:
                for n in range(1, 21):
                    group.start_soon(one, n)
            assert counts == {n: n for n in range(1, 21)}
            assert (await client.get("/health")).json() == {"ok": True}
    finally:
        process.stop()
