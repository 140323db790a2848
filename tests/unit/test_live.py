"""The parts of live results that need no server: the ``Range`` header, hostile values
included, and the worker's batching of pieces."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from async_task_middleware import Route
from async_task_middleware._web.headers import ByteRange, parse_range
from async_task_middleware._worker.live import BATCH_DELAY, BATCH_SIZE, Relay


def ranged(*values: bytes) -> ByteRange | None:
    return parse_range([(b"range", value) for value in values])


def test_the_three_forms_of_one_range() -> None:
    assert ranged(b"bytes=10-") == ByteRange(10, None)
    assert ranged(b"bytes=10-19") == ByteRange(10, 19)
    assert ranged(b"bytes=-5") == ByteRange(None, 5)
    assert ranged(b" bytes=0-0 ") == ByteRange(0, 0)
    assert ByteRange(10, None).resolve(100) == (10, 99)
    assert ByteRange(10, 500).resolve(100) == (10, 99)
    assert ByteRange(None, 5).resolve(100) == (95, 99)
    assert ByteRange(None, 500).resolve(100) == (0, 99)
    assert ByteRange(100, None).resolve(100) is None
    assert ByteRange(None, 0).resolve(100) is None
    assert ByteRange(0, None).resolve(0) is None


@pytest.mark.parametrize(
    "value",
    [
        b"bytes=5-3",  # backwards
        b"bytes=-",
        b"bytes=",
        b"items=0-5",
        b"bytes=0-5,10-20",  # several: the whole response instead
        b"bytes=1e3-",
        b"bytes=-1-2",
        b"bytes=0x10-",
        b"bytes=" + b"9" * 16 + b"-",  # past any response
        b"bytes=" + b"1" * 10_000 + b"-",
        b"bytes=0-\r\nX-Injected: 1",
        b"bytes=0-\x00",
        b"bytes=\xff-",
        b"bytes\t=0-",
    ],
)
def test_a_malformed_range_is_ignored(value: bytes) -> None:
    assert ranged(value) is None


def test_two_range_headers_or_if_range_are_ignored() -> None:
    assert ranged(b"bytes=0-1", b"bytes=2-3") is None
    headers = [(b"if-range", b'"etag"'), (b"range", b"bytes=0-1")]
    assert parse_range(headers) is None


def test_a_routes_response_size_is_checked() -> None:
    assert Route(max_response_size=1).max_response_size == 1
    for bad in (0, -1, True, 1.5, "10"):
        with pytest.raises(ValueError, match="max_response_size"):
            Route(max_response_size=bad)  # type: ignore[arg-type]


def test_pieces_are_written_in_batches_within_the_delay() -> None:
    """Many small pieces make few writes, none later than the batch delay (plus a thread's
    scheduling), a full batch at once, and the end with the last one; the head says what was
    produced so far."""
    writes: list[tuple[float, int, dict[str, object], int]] = []
    lock = threading.Lock()

    def write(batch: bytes, head: bytes, offset: int) -> bool:
        with lock:
            writes.append((time.monotonic(), len(batch), json.loads(head), offset))
        return True

    async def main() -> list[float]:
        relay = Relay(write, 200, [(b"content-type", b"text/plain")], 1, 10_000_000)
        sent = []
        for _ in range(50):  # 50 pieces of 100 bytes, 2 ms apart
            sent.append(time.monotonic())
            relay.add(b"x" * 100, False)
            await asyncio.sleep(0.002)
        relay.add(b"y" * BATCH_SIZE, False)  # a full batch goes out at once
        await relay.close()
        return sent

    sent = asyncio.run(main())
    assert 2 <= len(writes) <= 12, [w[1] for w in writes]
    assert sum(w[1] for w in writes) == 50 * 100 + BATCH_SIZE
    offsets = [w[3] for w in writes]
    assert offsets == [sum(w[1] for w in writes[:i]) for i in range(len(writes))]
    first = writes[0]
    assert first[0] - sent[0] < BATCH_DELAY + 0.05
    heads = [w[2] for w in writes]
    assert [h["produced"] for h in heads] == [
        o + w[1] for o, w in zip(offsets, writes, strict=True)
    ]
    assert [h["ended"] for h in heads] == [False] * (len(heads) - 1) + [True]
    assert heads[0]["status"] == 200
    assert ["cache-control", "private, no-store"] in heads[0]["headers"]  # type: ignore[operator]


def test_a_piece_after_a_pause_is_written_at_once() -> None:
    """The batch delay holds a piece back only while writes come close together: a token
    after a quiet moment goes out at once."""
    lags: list[float] = []
    sent: list[float] = []

    def write(batch: bytes, head: bytes, offset: int) -> bool:
        lags.append(time.monotonic() - sent[-1])
        return True

    async def main() -> None:
        relay = Relay(write, 200, [], 1, 1000)
        for _ in range(5):
            await asyncio.sleep(BATCH_DELAY * 2)
            sent.append(time.monotonic())
            relay.add(b"token", False)
        await asyncio.sleep(BATCH_DELAY * 2)
        await relay.close()

    asyncio.run(main())
    assert len(lags) == 5  # five pieces; the end alone is not written (the outcome says it)
    assert sorted(lags[:5])[2] < BATCH_DELAY / 2, lags


def test_a_relay_stops_once_a_write_is_refused() -> None:
    calls = []

    def write(batch: bytes, head: bytes, offset: int) -> bool:
        calls.append(offset)
        return False  # the task was deleted

    async def main() -> None:
        relay = Relay(write, 200, [], 1, 1000)
        relay.add(b"a" * 10, False)
        await asyncio.sleep(BATCH_DELAY * 3)
        relay.add(b"b" * 10, False)
        await relay.close()

    asyncio.run(main())
    assert calls == [0]
