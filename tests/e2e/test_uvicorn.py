"""The word count as a user runs it: uvicorn, a Celery worker and Redis, all real processes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests._servers import RedisServer, Uvicorn, Worker
from tests.conftest import FRAMEWORKS, LOCATION, final

pytestmark = pytest.mark.anyio


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


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise LookupError("VmHWM")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("VmRSS")


async def test_concurrent_large_bodies_cost_about_twice_their_size(
    example_worker: Worker, example_redis: RedisServer, logdir: Path
) -> None:
    """Bodies are read into one buffer and base64-encoded once, straight into the message:
    the web process's peak memory for N concurrent large bodies stays near 2x their size."""
    import anyio

    server = Uvicorn(
        "examples.wordcount.fastapi_app:app",
        {"REDIS_URL": example_redis.url},
        logdir / "uvicorn-memory.log",
    ).start()
    assert server._proc is not None
    pid = server._proc.pid
    count, size = 20, 4 * 1024 * 1024
    text = b"word " * (size // 5)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            # Warm up: imports, pools and the first script load are not what is measured.
            warm = await client.post("/words", files={"text": ("w.txt", b"a b")})
            assert warm.status_code == 303
            before = _rss_kib(pid)
            codes: list[int] = []

            async def one() -> None:
                response = await client.post("/words", files={"text": ("t.txt", text)})
                codes.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(one)
            peak = _rss_peak_kib(pid)
    finally:
        server.stop()
    # A 503 (the publish outran its deadline on a saturated machine) is a truthful answer
    # that enqueued nothing; this test is about memory.
    assert set(codes) <= {303, 503}, codes
    assert codes.count(303) >= count // 2, codes
    growth = (peak - before) * 1024
    total = count * len(text)
    print(
        f"web RSS peak growth for {count} x {len(text) / 2**20:.1f} MiB bodies: "
        f"{growth / total:.2f}x their total size"
    )
    assert growth < 2.5 * total, f"{growth / total:.2f}x"


def test_trickling_bodies_are_answered_408_and_dropped(logdir: Path, worker: Worker) -> None:
    """200 connections sending a byte at a time: each is answered 408 once the body deadline
    (1 s here) passes, and closed."""
    import os
    import socket
    import time

    server = Uvicorn(
        "tests.apps:strict_app", {"REDIS_URL": os.environ["REDIS_URL"]}, logdir / "strict.log"
    ).start()
    socks: list[socket.socket] = []
    try:
        request = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(request)
            socks.append(sock)
        started = time.monotonic()
        answers: list[bytes] = [b""] * len(socks)
        closed = [False] * len(socks)
        for sock in socks:
            sock.setblocking(False)
        while not all(closed) and time.monotonic() - started < 10:
            for i, sock in enumerate(socks):
                if closed[i]:
                    continue
                try:
                    chunk = sock.recv(4096)  # read first: the answer may be waiting
                    if chunk == b"":
                        closed[i] = True
                        continue
                    answers[i] += chunk
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = True  # reset: the server hung up on the unread trickle
                    continue
                try:
                    sock.send(b"x")
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = True
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    assert all(closed), f"{closed.count(False)} connections still open after {elapsed:.1f} s"
    # A server that closes a socket with unread input resets it, which can discard the answer
    # before it is read: every answer read is the 408, and most are read.
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers if a), {a[:20] for a in answers}
    assert sum(1 for a in answers if a) >= len(answers) // 2
    assert elapsed < 6
