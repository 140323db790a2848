"""Live results (PROTOCOL section 8): an endpoint's streamed response reaches a waiting caller
as it is produced, through the queue. Real processes: uvicorn serving the probe app, the suite's
Celery worker, Redis."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
import redis

from async_task_middleware.client import run_task
from tests._servers import RedisServer, Uvicorn, Worker
from tests.apps import probe_app
from tests.conftest import final, make_client

pytestmark = pytest.mark.anyio

WAIT = {"prefer": "wait=10"}


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, logdir: Path) -> Iterator[Uvicorn]:
    env = {"REDIS_URL": redis_server.url}
    server = Uvicorn("tests.apps:capped_app", env, logdir / "live-uvicorn.log").start()
    yield server
    server.stop()


@pytest.fixture
async def http(served: Uvicorn, worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        yield client


async def lines_as_they_come(response: httpx.Response) -> list[tuple[float, bytes]]:
    """Each NDJSON line with the time it arrived."""
    seen: list[tuple[float, bytes]] = []
    async for line in response.aiter_lines():
        seen.append((time.time(), line.encode()))
    return seen


async def read_to_the_end(response: httpx.Response) -> tuple[int, bool]:
    """The bytes read, and whether the connection was closed before the body's end."""
    received = 0
    try:
        async for piece in response.aiter_bytes():
            received += len(piece)
    except httpx.RemoteProtocolError:
        return received, True
    return received, False


async def test_a_streamed_response_arrives_live_piece_by_piece(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/stream?n=10&delay=0.2&size=200", headers=WAIT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["preference-applied"] == "wait=10"
        location = response.headers["content-location"]
        seen = await lines_as_they_come(response)
    assert len(seen) == 10
    sent = [json.loads(line)["sent"] for _, line in seen]
    lags = [arrived - at for (arrived, _), at in zip(seen, sent, strict=True)]
    # Spread out in time as the endpoint sent them, not all at the end.
    assert seen[0][0] < sent[-1] - 1.0, (seen[0][0], sent[-1])
    assert max(lags) < 0.5, lags
    stored = await final(http, location.removeprefix(str(http.base_url).rstrip("/")))
    assert stored.status_code == 200
    assert stored.content == b"".join(line + b"\n" for _, line in seen)
    assert stored.headers["content-length"] == str(len(stored.content))


async def test_a_live_answer_ends_only_once_the_status_url_serves_it(
    http: httpx.AsyncClient,
) -> None:
    """The endpoint's last piece is not the task's end: a background task runs after it, before
    the outcome is stored. The live answer's end waits for the outcome, so the status URL read
    right after it serves the same response, never a 202."""
    started = time.monotonic()
    async with http.stream("POST", "/stream?n=3&delay=0&after=1.5", headers=WAIT) as response:
        assert response.status_code == 200
        body = await response.aread()
        location = response.headers["content-location"]
    assert time.monotonic() - started >= 1.5  # the background task's sleep included
    again = await http.get(location.removeprefix(str(http.base_url).rstrip("/")))
    assert again.status_code == 200
    assert again.content == body


async def test_the_live_bytes_are_the_in_process_responses(http: httpx.AsyncClient) -> None:
    url = "/stream?n=8&delay=0.05&size=3000&static=1"
    async with http.stream("POST", url, headers=WAIT) as response:
        live = b"".join([piece async for piece in response.aiter_bytes()])
        live_type = response.headers["content-type"]
    direct = probe_app.router  # the same endpoint, served in process without the middleware
    async with make_client(direct) as client:
        plain = await client.post(url)
    assert plain.status_code == 200
    assert live == plain.content
    assert live_type == plain.headers["content-type"]


async def test_a_plain_get_while_it_streams_is_202_with_the_bytes_produced(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/stream?n=20&delay=0.1&size=100")
    location = response.headers["location"]
    produced = []
    with anyio.fail_after(20):
        while (poll := await http.get(location)).status_code == 202:
            if "produced" in poll.json():
                produced.append(poll.json()["produced"])
            await anyio.sleep(0.1)
    assert poll.status_code == 200
    assert produced
    assert produced == sorted(produced), produced
    assert 0 < produced[0] < len(poll.content)


async def test_a_caller_that_leaves_loses_nothing_and_resumes_with_range(
    http: httpx.AsyncClient,
) -> None:
    async with http.stream("POST", "/stream?n=15&delay=0.1&size=100", headers=WAIT) as response:
        location = response.headers["content-location"]
        kept = b""
        async for piece in response.aiter_bytes():
            kept += piece
            if kept.count(b"\n") >= 3:
                break  # the caller goes away mid-stream
    # Back, from the byte it had, live while the task runs.
    ranged = {"range": f"bytes={len(kept)}-"}
    async with http.stream("GET", location, headers=ranged) as resumed:
        assert resumed.status_code == 206
        assert resumed.headers["content-range"].startswith(f"bytes {len(kept)}-")
        rest = b"".join([piece async for piece in resumed.aiter_bytes()])
    whole = await final(http, location)
    assert whole.status_code == 200
    assert kept + rest == whole.content
    assert len(whole.content.splitlines()) == 15
    # The finished task answers ranges too, exactly.
    done = await http.get(location, headers=ranged)
    assert done.status_code == 206
    size = len(whole.content)
    assert done.headers["content-range"] == f"bytes {len(kept)}-{size - 1}/{size}"
    assert done.content == rest
    tail = await http.get(location, headers={"range": "bytes=-10"})
    assert tail.status_code == 206
    assert tail.content == whole.content[-10:]
    past = await http.get(location, headers={"range": f"bytes={size}-"})
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{size}"


async def test_a_get_with_prefer_wait_joins_the_stream_from_its_first_byte(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/stream?n=12&delay=0.1&size=100")
    location = response.headers["location"]
    await anyio.sleep(0.5)  # some of it produced already
    async with http.stream("GET", location, headers=WAIT) as live:
        assert live.status_code == 200
        body = b"".join([piece async for piece in live.aiter_bytes()])
    assert body == (await final(http, location)).content
    assert len(body.splitlines()) == 12


async def test_a_delete_mid_stream_cuts_every_reader_short(
    http: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    response = await http.post("/stream?n=100&delay=0.1&size=100")
    location = response.headers["location"]
    got: list[bytes] = []

    async def read() -> None:
        async with http.stream("GET", location, headers=WAIT) as live:
            async for piece in live.aiter_bytes():
                got.append(piece)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tasks:
            errors: list[BaseException] = []

            async def reader() -> None:
                try:
                    await read()
                except httpx.RemoteProtocolError as exc:
                    errors.append(exc)

            for _ in range(3):
                tasks.start_soon(reader)
            while b"".join(got).count(b"\n") < 6:
                await anyio.sleep(0.05)
            assert (await http.delete(location)).status_code == 204
    assert len(errors) == 3  # closed short: never a body that looks complete
    assert (await http.get(location)).status_code == 404
    task_id = location.rsplit("/", 1)[1]
    client = redis.Redis.from_url(redis_server.url)
    await anyio.sleep(0.5)
    assert not client.exists(f"async-task-middleware-stream-{task_id}")
    assert not client.exists(f"async-task-middleware-head-{task_id}")


async def test_a_stream_past_the_size_limit_fails_and_cuts_readers_short(
    http: httpx.AsyncClient,
) -> None:
    # 200 lines of 1 KiB through a route capped at 64 KiB.
    url = "/capped?n=200&delay=0.005&size=1024"
    async with http.stream("POST", url, headers=WAIT) as response:
        assert response.status_code == 200
        location = response.headers["content-location"]
        received, short = await read_to_the_end(response)
    assert short
    assert 0 < received <= 64 * 1024
    failed = await final(http, location)
    assert failed.status_code == 500


async def test_a_stream_that_raises_cuts_readers_short(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/stream?n=10&fail=4&delay=0.05", headers=WAIT) as response:
        location = response.headers["content-location"]
        received, short = await read_to_the_end(response)
    assert short
    assert received == 4 * 64
    assert (await final(http, location)).status_code == 500


async def test_a_hundred_readers_share_one_stream(
    http: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    response = await http.post("/stream?n=20&delay=0.1&size=500")
    location = response.headers["location"]
    bodies: list[bytes] = []
    client = redis.Redis.from_url(redis_server.url)
    held: list[int] = []

    def web_connections() -> int:
        names = [c.get("name") for c in client.client_list()]
        return names.count("async-task-middleware-web")

    async def reader() -> None:
        async with (
            httpx.AsyncClient(base_url=str(http.base_url), timeout=60) as own,
            own.stream("GET", location, headers=WAIT) as live,
        ):
            assert live.status_code == 200
            bodies.append(b"".join([piece async for piece in live.aiter_bytes()]))

    with anyio.fail_after(40):
        async with anyio.create_task_group() as tasks:
            # Other web processes of the run share this Redis: count the connections added.
            before = web_connections()
            for _ in range(100):
                tasks.start_soon(reader)
            for _ in range(8):  # while the stream runs (2 s)
                await anyio.sleep(0.2)
                held.append(web_connections() - before)
    whole = (await final(http, location)).content
    assert len(bodies) == 100
    assert all(body == whole for body in bodies)
    assert max(held) <= 12, held  # a handful, not one per reader


async def test_the_client_streams_the_pieces_and_resumes_a_dropped_connection(
    served: Uvicorn, worker: Worker
) -> None:
    """``stream_task`` through a proxy that cuts the first two connections after 1 KiB: the
    pieces still join into the whole response, and the first came long before the end."""
    async with _cutting_proxy(served.port, cut_after=1024, cuts=2) as port:
        base = f"http://127.0.0.1:{port}"
        arrived: list[float] = []
        got = b""
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            pieces = await run_task(http, "POST", "/stream?n=30&delay=0.05&size=200", stream=True)
            async for piece in pieces:
                arrived.append(time.time())
                got += piece
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as http:
        lines = got.splitlines()
        assert len(lines) == 30
        assert [json.loads(line)["i"] for line in lines] == list(range(30))
        assert arrived[-1] - arrived[0] > 1.0  # spread out, not all at the end


def test_the_command_line_writes_the_stream_as_it_comes(served: Uvicorn, worker: Worker) -> None:
    command = [sys.executable, "-m", "async_task_middleware.client", "--stream", "POST"]
    url = f"{served.url}/stream?n=10&delay=0.2&size=100"
    with subprocess.Popen([*command, url], stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        first = process.stdout.readline()
        first_at = time.time()
        rest = process.stdout.read()
        ended_at = time.time()
    assert process.returncode == 0
    assert json.loads(first)["i"] == 0
    assert len(rest.splitlines()) == 9
    assert ended_at - first_at > 1.0  # the first line was out long before the last


@contextlib.asynccontextmanager
async def _cutting_proxy(target: int, cut_after: int, cuts: int) -> AsyncIterator[int]:
    """A TCP proxy to ``target`` that closes each of its first ``cuts`` connections once
    ``cut_after`` bytes of the answer went through it."""
    left = [cuts]
    cutting: list[int] = []

    async def handle(client: anyio.abc.SocketStream) -> None:
        cut = left[0] > 0
        left[0] -= 1
        async with client, await anyio.connect_tcp("127.0.0.1", target) as upstream:

            async def up() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for data in client:
                        await upstream.send(data)

            async def down() -> None:
                sent = 0
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for data in upstream:
                        if cut and sent + len(data) > cut_after:
                            await client.send(data[: cut_after - sent])
                            cutting.append(1)
                            break
                        sent += len(data)
                        await client.send(data)
                tasks.cancel_scope.cancel()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(up)
                tasks.start_soon(down)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, handle)
            try:
                yield port
            finally:
                group.cancel_scope.cancel()
    finally:
        await listener.aclose()
    assert len(cutting) == cuts, "the connections were not all cut"
