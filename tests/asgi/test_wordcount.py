"""The word count on FastAPI, Starlette and Litestar, with a real Redis and a real worker."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest

from tests.conftest import final, submit

pytestmark = pytest.mark.anyio


async def test_submit_then_result(client: httpx.AsyncClient) -> None:
    location = await submit(client, "/words", files={"text": ("a.txt", b"one two  three\nfour")})
    assert location.startswith("/words/")
    response = await final(client, location)
    assert response.status_code == 200
    assert response.json() == {"count": 4}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    # The result stays readable until it expires or is deleted.
    again = await client.get(location)
    assert again.status_code == 200
    assert again.content == response.content
    head = await client.head(location)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == response.headers["content-length"]


async def test_endpoint_own_4xx_is_the_result(client: httpx.AsyncClient) -> None:
    # No 'text' field: each framework's own validation says no, and that answer is replayed.
    location = await submit(client, "/words", files={"other": ("a.txt", b"x")})
    response = await final(client, location)
    assert 400 <= response.status_code < 500
    assert response.status_code in (400, 422)


@pytest.mark.parametrize(
    "task_id", ["nope", "1234", str(uuid.uuid4()).upper(), "0" * 36, str(uuid.uuid1())]
)
async def test_malformed_id_is_404(client: httpx.AsyncClient, task_id: str) -> None:
    response = await client.get(f"/words/{task_id}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


async def test_unknown_id_is_404_like_a_deleted_one(client: httpx.AsyncClient) -> None:
    unknown = await client.get(f"/words/{uuid.uuid4()}")
    location = await submit(client, "/words", files={"text": ("a.txt", b"a b")})
    assert (await final(client, location)).status_code == 200
    deleted = await client.delete(location)
    assert deleted.status_code == 204
    assert deleted.content == b""
    gone = await client.get(location)
    assert unknown.status_code == gone.status_code == 404
    assert {k: v for k, v in unknown.json().items() if k != "instance"} == {
        k: v for k, v in gone.json().items() if k != "instance"
    }
    assert (await client.delete(location)).status_code == 404
    assert (await client.delete(f"/words/{uuid.uuid4()}")).status_code == 404


async def test_other_methods_on_status_url_are_405(client: httpx.AsyncClient) -> None:
    response = await client.put(f"/words/{uuid.uuid4()}", content=b"x")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, DELETE"


async def test_body_over_limit_is_413_and_nothing_enqueued(client: httpx.AsyncClient) -> None:
    big = b"x" * (10 * 1024 * 1024 + 1)
    response = await client.post("/words", content=big, headers={"content-type": "text/plain"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "location" not in response.headers


async def test_unmarked_route_passes_through(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    # Another method on the marked path is the app's, not the middleware's.
    assert (await client.get("/words")).status_code == 405


async def test_hundred_concurrent_submissions(client: httpx.AsyncClient) -> None:
    texts = {i: " ".join(["w"] * i) for i in range(1, 101)}
    locations: dict[int, str] = {}

    async def one(i: int) -> None:
        locations[i] = await submit(client, "/words", files={"text": ("t.txt", texts[i].encode())})

    async with anyio.create_task_group() as tg:
        for i in texts:
            tg.start_soon(one, i)
    assert len(set(locations.values())) == 100

    counts: dict[int, int] = {}

    async def collect(i: int) -> None:
        response = await final(client, locations[i], timeout=60)
        assert response.status_code == 200
        counts[i] = response.json()["count"]

    async with anyio.create_task_group() as tg:
        for i in texts:
            tg.start_soon(collect, i)
    assert counts == {i: i for i in texts}
