"""The lane: one pipelined connection per event loop carries the status reads and the small
submissions; every reply reaches its own caller, through deadlines, stalls, cancels, error
replies and restarts."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from async_task_middleware._shared.binding import Binding
from async_task_middleware._web.state import StoreUnavailable
from async_task_middleware._web.store import CLIENT_NAME, TaskStore
from tests._servers import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def lane_redis(logdir: Path) -> Iterator[RedisServer]:
    with RedisServer(logdir / f"lane-{uuid.uuid4().hex[:8]}") as server:
        yield server


@pytest.fixture
async def store(lane_redis: RedisServer) -> AsyncIterator[TaskStore]:
    celery = Celery("lane", broker=lane_redis.url, backend=lane_redis.url)
    store = TaskStore(Binding.of(celery), timeout=1.0, max_connections=8)
    yield store
    await store.aclose()


def _records(server: RedisServer, store: TaskStore, count: int) -> list[str]:
    """``count`` tasks written straight into Redis, each record naming its own id."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    client = redis.Redis.from_url(server.url)
    with client.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.set(store._binding.record_key(task_id), json.dumps({"v": 1, "route": task_id}))
        pipe.execute()
    client.close()
    return ids


def _web_connections(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return sum(1 for c in client.client_list() if c["name"] == CLIENT_NAME)
    finally:
        client.close()


async def test_concurrent_reads_each_get_their_own_task(
    lane_redis: RedisServer, store: TaskStore
) -> None:
    ids = _records(lane_redis, store, 2000)
    unknown = [str(uuid.uuid4()) for _ in range(200)]
    asked = ids + unknown
    random.shuffle(asked)
    states = await asyncio.gather(*(store.read(task_id) for task_id in asked))
    for task_id, state in zip(asked, states, strict=True):
        if task_id in unknown:
            assert state.record is None
        else:
            assert state.record is not None
            assert state.record["route"] == task_id
    assert _web_connections(lane_redis) == 1  # 2,200 reads at once, one connection


async def test_an_error_reply_fails_its_caller_only(
    lane_redis: RedisServer, store: TaskStore
) -> None:
    ids = _records(lane_redis, store, 50)
    calls = [store.read(task_id) for task_id in ids]
    raising = store._redis.register_script("return redis.error_reply('no')")
    failing = store._evalsha(raising, [], [], _soon(1.0))
    results = await asyncio.gather(*calls[:25], failing, *calls[25:], return_exceptions=True)
    assert isinstance(results[25], redis.ResponseError)
    good = results[:25] + results[26:]
    assert [s.record["route"] for s in good] == ids  # type: ignore[union-attr]
    assert (await store.read(ids[0])).record is not None  # the connection carries on
    assert _web_connections(lane_redis) == 1


async def test_a_cancelled_caller_does_not_shift_the_replies(
    lane_redis: RedisServer, store: TaskStore
) -> None:
    ids = _records(lane_redis, store, 300)
    tasks = [asyncio.create_task(store.read(task_id)) for task_id in ids]
    await asyncio.sleep(0)  # every command written
    victims = set(random.sample(range(len(ids)), 10))
    for index in victims:
        tasks[index].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for index, (task_id, result) in enumerate(zip(ids, results, strict=True)):
        if index in victims:
            assert isinstance(result, asyncio.CancelledError)
        else:  # read again on a new connection, within the caller's deadline
            assert not isinstance(result, BaseException)
            assert result.record is not None
            assert result.record["route"] == task_id


async def test_a_stalled_redis_is_a_503_within_the_deadline_then_recovers(
    lane_redis: RedisServer, store: TaskStore
) -> None:
    ids = _records(lane_redis, store, 20)
    await store.read(ids[0])
    lane_redis.pause()
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(store.read(i) for i in ids), return_exceptions=True)
        took = time.monotonic() - started
    finally:
        lane_redis.resume()
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert took < 1.5  # the 1 s deadline, not a hang
    states = await asyncio.gather(*(store.read(i) for i in ids))
    assert [s.record["route"] for s in states] == ids  # type: ignore[index]


async def test_a_restarted_redis_is_found_again(lane_redis: RedisServer, store: TaskStore) -> None:
    ids = _records(lane_redis, store, 5)
    await store.read(ids[0])
    lane_redis.kill()
    lane_redis.start()  # the same port, empty: nothing persisted
    state = await store.read(ids[0])  # reconnected within the deadline, not a 503
    assert state.record is None


async def test_a_script_redis_forgot_is_loaded_again(
    lane_redis: RedisServer, store: TaskStore
) -> None:
    script = store._redis.register_script("return ARGV[1]")
    assert await store._evalsha(script, [], [b"one"], _soon(1.0)) == b"one"
    redis.Redis.from_url(lane_redis.url).script_flush()
    assert await store._evalsha(script, [], [b"two"], _soon(1.0)) == b"two"


async def test_each_caller_fails_at_its_own_deadline(
    lane_redis: RedisServer, store: TaskStore
) -> None:
    """One timer watches every call's deadline: with Redis stalled, a call due in 0.3 s fails
    then, and the reads due in 1 s (the store's timeout) at theirs, not before, not later."""
    ids = _records(lane_redis, store, 10)
    await store.read(ids[0])
    script = store._redis.register_script("return 1")
    await store._evalsha(script, [], [], _soon(1.0))  # loaded

    async def timed(call: Awaitable[object]) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            await call
        except BaseException as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    lane_redis.pause()
    try:
        reads = [timed(store.read(i)) for i in ids]
        short = timed(store._evalsha(script, [], [], _soon(0.3)))
        results = await asyncio.gather(*reads[:5], short, *reads[5:])
    finally:
        lane_redis.resume()
    took, error = results[5]
    assert isinstance(error, TimeoutError), error
    assert 0.25 < took < 0.6, took
    for took, error in results[:5] + results[6:]:
        assert isinstance(error, StoreUnavailable), error
        assert 0.9 < took < 1.4, took
    assert (await store.read(ids[0])).record is not None  # and it recovers


def _soon(seconds: float) -> float:
    """A deadline ``seconds`` from now, on the running loop's clock."""
    return asyncio.get_running_loop().time() + seconds
