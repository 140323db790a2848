"""The owner's collection (``tasks_path``): each owner sees their own tasks, newest first,
page by page, filtered; cursors that cannot be forged nor used by another; anonymous callers
and other methods refused. The probe app in process, the session's real worker behind it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from async_task_middleware import header_owner
from tests._servers import Worker
from tests.apps import build_probe, celery_app
from tests.conftest import final, make_client, submit

pytestmark = pytest.mark.anyio


@pytest.fixture
async def listing(worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    app = build_probe(celery_app, owner=header_owner("authorization"), tasks_path="/tasks")
    async with LifespanManager(app), make_client(app) as client:
        yield client


def owner() -> dict[str, str]:
    return {"authorization": f"Bearer {secrets.token_hex(8)}"}


async def all_pages(
    client: httpx.AsyncClient, who: dict[str, str], query: str = "", limit: int = 50
) -> tuple[list[dict[str, Any]], int]:
    """Every task the list gives ``who``, following ``Link: rel=next``; and the pages."""
    url: str | None = f"/tasks?limit={limit}{query}"
    found, pages = [], 0
    while url is not None:
        response = await client.get(url, headers=who)
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        found += body["tasks"]
        pages += 1
        link = response.headers.get("link")
        assert (link is None) == (body["next"] is None)
        url = link.split(">", 1)[0][1:] if link else None
    return found, pages


async def test_two_owners_see_only_their_own_newest_first_across_pages(
    listing: httpx.AsyncClient,
) -> None:
    alice, bob = owner(), owner()
    mine: dict[str, list[str]] = {"alice": [], "bob": []}
    for i in range(120):
        for name, who in (("alice", alice), ("bob", bob)):
            location = await submit(listing, f"/mark?key=list-{name}-{i}", headers=who)
            mine[name].append(location)
    for name, who in (("alice", alice), ("bob", bob)):
        found, pages = await all_pages(listing, who)
        assert pages == 3  # 50, 50, 20
        assert [t["location"] for t in found] == mine[name][::-1]
        assert {t["route"] for t in found} == {"POST /mark"}
        assert all(t["task_id"] == t["location"].rsplit("/", 1)[1] for t in found)
    # Once done, each says so, with the response's status and when it ended.
    for location in mine["alice"][-3:]:
        assert (await final(listing, location, headers=alice)).status_code == 200
    with anyio.fail_after(60):
        while len((await all_pages(listing, alice, "&status=done", 500))[0]) < 120:
            await anyio.sleep(0.2)
    done, _ = await all_pages(listing, alice, "&status=done", 500)
    assert {(t["status"], t["http_status"]) for t in done} == {("done", 200)}
    assert all(t["ended"] and t["created"] for t in done)
    assert (await all_pages(listing, alice, "&status=queued&status=running"))[0] == []
    assert len((await all_pages(listing, alice, "&route=POST+/mark", 7))[0]) == 120
    assert (await all_pages(listing, alice, "&route=POST+/echo"))[0] == []


async def test_a_deleted_task_leaves_the_list_at_once(listing: httpx.AsyncClient) -> None:
    who = owner()
    kept = await submit(listing, "/slow?seconds=5", headers=who)
    gone = await submit(listing, "/slow?seconds=5", headers=who)
    assert (await listing.delete(gone, headers=who)).status_code == 204
    found, _ = await all_pages(listing, who)
    assert [t["location"] for t in found] == [kept]
    assert found[0]["status"] in ("queued", "running")
    assert found[0]["http_status"] is None


async def test_a_cursor_is_bound_to_its_owner_and_its_filters(listing: httpx.AsyncClient) -> None:
    alice, bob = owner(), owner()
    for i in range(3):
        await submit(listing, f"/mark?key=cursor-{i}", headers=alice)
    first = (await listing.get("/tasks?limit=1", headers=alice)).json()
    cursor = first["next"]
    assert cursor
    ok = await listing.get(f"/tasks?limit=1&cursor={cursor}", headers=alice)
    assert ok.status_code == 200
    assert ok.json()["tasks"][0]["task_id"] != first["tasks"][0]["task_id"]
    body, _, mac = cursor.partition(".")
    forged = [
        f"{body}.{'0' * len(mac)}",
        f"{body[:-2]}AA.{mac}",
        "x" * 600,
        "not-a-cursor",
        "",
        f"{body}.{mac}\x00",
    ]
    for bad in forged:
        refused = await listing.get("/tasks", params={"limit": 1, "cursor": bad}, headers=alice)
        assert refused.status_code == 400, bad
        assert refused.json()["type"].endswith(":bad-request")
    stolen = await listing.get(f"/tasks?limit=1&cursor={cursor}", headers=bob)
    assert stolen.status_code == 400
    other_filter = await listing.get(f"/tasks?limit=1&status=done&cursor={cursor}", headers=alice)
    assert other_filter.status_code == 400


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=abc",
        "limit=1e3",
        "status=bogus",
        "status=DONE",
        "route=" + "x" * 301,
        "route=",
        "route=%0aPOST",
        "status=%ff",
    ],
)
async def test_hostile_queries_are_a_400(listing: httpx.AsyncClient, query: str) -> None:
    response = await listing.get(f"/tasks?{query}", headers=owner())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in response.text


async def test_anonymous_other_methods_and_head(listing: httpx.AsyncClient) -> None:
    await submit(listing, "/mark?key=anonymous-listed")
    assert (await listing.get("/tasks")).status_code == 404  # anonymous: never listed
    who = owner()
    await submit(listing, "/mark?key=head-listed", headers=who)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        refused = await listing.request(method, "/tasks", headers=who)
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"
    got = await listing.get("/tasks", headers=who)
    head = await listing.head("/tasks", headers=who)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert (await listing.get("/tasks/", headers=who)).status_code == 404  # the app's own
