"""The fault-injection suite: real Redis, real workers, killed and paused while requests flow.

    python -m tests.faults            # the long version: 1,000 submissions per scenario
    python -m tests.faults --short    # what CI runs (through tests/faults/test_fault_suite.py)

Every scenario submits requests to the probe app's ``POST /mark`` (each counts its runs in
Redis under a key of its own and answers with that key), does its damage meanwhile, then polls
every accepted task until it is final. It prints, per scenario: submitted, 303s, 503s (refused:
nothing was promised), final outcomes, lost (a 303 that never became final), re-runs (an
endpoint that ran twice: at-least-once delivery after a kill) and wrong results (a result that
names another task's key, or two tasks sharing one).
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import redis
from asgi_lifespan import LifespanManager
from celery import Celery

from tests._servers import RedisServer, Sentinels, Worker

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
# The web side and the workers share one secret (owner hashes, sealed credential headers).
os.environ.setdefault("ATM_SECRET_KEY", secrets.token_urlsafe(32))
# The example's shipped settings: leases on, a 60 s visibility timeout, a restore sweep every
# 10 s. The probe's replays have a 3 s time limit.
VISIBILITY = 60
RESTORE_INTERVAL = 10
CONCURRENCY = 20


@dataclass
class Tally:
    scenario: str
    broker: str
    submitted: int = 0
    accepted: int = 0
    refused: int = 0
    done: int = 0
    failed: int = 0
    lost: int = 0
    # Of the lost: messages Redis dropped when it was killed between kombu's BRPOP and its
    # unacked write (the record is there, no worker began it, the message is in neither
    # place), that the sweep after the restart did not push again.
    broker_gap: int = 0
    reruns: int = 0
    wrong: int = 0
    seconds: float = 0.0
    recovery: float | None = None  # from the last fault to the last task's completion
    locations: dict[int, str] = field(default_factory=dict)

    def row(self) -> str:
        recovery = "" if self.recovery is None else f"{self.recovery:.0f}"
        return (
            f"| {self.scenario} | {self.broker} | {self.submitted} | {self.accepted} | "
            f"{self.refused} | {self.done} | {self.failed} | {self.lost} | {self.reruns} | "
            f"{self.wrong} | {self.broker_gap} | {recovery} | {self.seconds:.0f} |"
        )


HEADER = (
    "| scenario | broker | submitted | 303 | 503 | 200 | 500 | lost | re-runs | wrong "
    "| of the lost, BRPOP gap | recovery s | s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


class Rig:
    """One scenario's Redis, worker and in-process web app."""

    def __init__(self, workdir: Path, broker: str) -> None:
        # The store and broker; with Sentinel, only the ledger of runs, apart from the
        # deployment under test.
        self.redis = RedisServer(workdir / "redis", persistent=True)
        self.sentinels = Sentinels(workdir / "sentinel") if broker == "sentinel" else None
        self.broker = broker
        self._workdir = workdir
        self.worker: Worker | None = None
        self.idle: Worker | None = None
        self.last_fault: float | None = None
        self.time_limit = 3

    @property
    def url(self) -> str:
        return self.sentinels.url if self.sentinels else self.redis.url

    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.url,
            "REDIS_SENTINEL_MASTER": Sentinels.MASTER if self.sentinels else "",
            "ATM_TEST_COUNTER_URL": self.redis.url,
            "BROKER_URL": RABBITMQ_URL if self.broker == "rabbitmq" else "",
            "ATM_TEST_TIME_LIMIT": str(self.time_limit),
            "ATM_TEST_VISIBILITY": str(VISIBILITY),
            "ATM_TEST_RESTORE_INTERVAL": str(RESTORE_INTERVAL),
        }

    def store(self) -> redis.Redis:
        """A client of the store's Redis: with Sentinel, the master of the moment."""
        if self.sentinels is None:
            return redis.Redis.from_url(self.redis.url)
        port = self.sentinels.master_port()
        assert port is not None, "the sentinels agree on no master"
        return redis.Redis(port=port)

    def start_worker(self) -> None:
        self.worker = Worker("tests.worker", self.env(), self._workdir / "worker.log").start()

    def start_idle_worker(self) -> None:
        self.idle = Worker(
            "tests.worker", self.env(), self._workdir / "idle.log", node="idle"
        ).start()

    def kill_worker(self) -> None:
        """SIGKILL the whole worker, its main process and pool children at once."""
        assert self.worker is not None
        self.worker.kill()
        self.last_fault = time.monotonic()

    def celery(self) -> Celery:
        broker = RABBITMQ_URL if self.broker == "rabbitmq" else self.url
        app = Celery("faults", broker=broker, backend=self.url)
        sentinel = {"master_name": Sentinels.MASTER} if self.sentinels else {}
        app.conf.broker_transport_options = {
            "confirm_publish": True,
            "visibility_timeout": VISIBILITY,
            **sentinel,
        }
        app.conf.result_backend_transport_options = sentinel
        return app


Chaos = Callable[[Rig, anyio.Event], Awaitable[None]]
#: Each replay runs five times the visibility timeout while a second worker waits beside the
#: first: leases must keep it from ever being delivered twice.
LONG = "replays 5x the visibility timeout, a second worker idle"
LONG_SECONDS = 5 * VISIBILITY


async def no_chaos(rig: Rig, submitted: anyio.Event) -> None:
    await submitted.wait()


async def kill_worker_once(rig: Rig, submitted: anyio.Event) -> None:
    await anyio.sleep(1.0)  # requests are being replayed now
    rig.kill_worker()
    await anyio.sleep(1.0)
    await anyio.to_thread.run_sync(rig.start_worker)
    await submitted.wait()


async def kill_worker_every_3s(rig: Rig, submitted: anyio.Event) -> None:
    while not submitted.is_set():
        await anyio.sleep(3.0)
        rig.kill_worker()
        await anyio.to_thread.run_sync(rig.start_worker)
    # And once more while the queue drains.
    await anyio.sleep(2.0)
    rig.kill_worker()
    await anyio.to_thread.run_sync(rig.start_worker)


async def kill_one_of_two(rig: Rig, submitted: anyio.Event) -> None:
    # A second worker beside the first, which stays up; nothing is started in the killed one's
    # place: the survivor takes back what the dead one held (its leases lapse) or took.
    await anyio.to_thread.run_sync(rig.start_idle_worker)
    await anyio.sleep(1.0)
    rig.kill_worker()
    await submitted.wait()


async def second_worker_idle(rig: Rig, submitted: anyio.Event) -> None:
    await anyio.sleep(1.0)  # the long replays are running on the first worker now
    await anyio.to_thread.run_sync(rig.start_idle_worker)
    await submitted.wait()


async def restart_redis(rig: Rig, submitted: anyio.Event) -> None:
    await anyio.sleep(1.0)
    rig.last_fault = time.monotonic()
    rig.redis.kill()  # SIGKILL: only what the append-only file holds survives
    await anyio.sleep(1.0)
    await anyio.to_thread.run_sync(rig.redis.start)
    await submitted.wait()


async def pause_redis(rig: Rig, submitted: anyio.Event) -> None:
    await anyio.sleep(1.0)
    rig.last_fault = time.monotonic()
    rig.redis.pause()
    await anyio.sleep(3.0)
    rig.redis.resume()
    await submitted.wait()


async def kill_sentinel_master(rig: Rig, submitted: anyio.Event) -> None:
    assert rig.sentinels is not None
    await anyio.sleep(1.0)
    rig.last_fault = time.monotonic()
    rig.sentinels.master.kill()  # SIGKILL; Sentinel promotes the replica
    await submitted.wait()


SENTINEL = "Sentinel: master SIGKILLed mid-run, the replica promoted"
SCENARIOS: dict[str, tuple[Chaos, tuple[str, ...]]] = {
    "no faults": (no_chaos, ("redis",)),
    "whole worker SIGKILLed mid-replay, a new one started": (
        kill_worker_once,
        ("redis", "rabbitmq"),
    ),
    "whole worker SIGKILLed every 3 s": (kill_worker_every_3s, ("redis",)),
    "one of two workers SIGKILLed whole, none started in its place": (
        kill_one_of_two,
        ("redis", "rabbitmq"),
    ),
    "Redis SIGKILLed and restarted": (restart_redis, ("redis",)),
    "Redis paused 3 s": (pause_redis, ("redis",)),
    SENTINEL: (kill_sentinel_master, ("sentinel",)),
    LONG: (second_worker_idle, ("redis",)),
}


async def run(scenario: str, broker: str, count: int, workdir: Path) -> Tally:
    from tests.apps import build_probe

    chaos, _ = SCENARIOS[scenario]
    tally = Tally(scenario, broker)
    rig = Rig(workdir, broker)
    if scenario == LONG:
        rig.time_limit = LONG_SECONDS + 30
        count = min(count, 4)  # a few, each as long as five visibility timeouts
    seconds = LONG_SECONDS if scenario == LONG else 0.05
    rig.redis.start()
    if rig.sentinels is not None:
        rig.sentinels.start()
    started = time.monotonic()
    try:
        rig.start_worker()
        app = build_probe(rig.celery())
        transport = httpx.ASGITransport(app=app)
        async with (
            LifespanManager(app),
            httpx.AsyncClient(transport=transport, base_url="http://faults", timeout=30) as client,
        ):
            submitted = anyio.Event()
            limiter = anyio.CapacityLimiter(CONCURRENCY)

            async def submit(i: int) -> None:
                async with limiter:
                    tally.submitted += 1
                    url = f"/mark?key=fault-{i}&seconds={seconds}"
                    response = await client.post(url)
                if response.status_code == 303:
                    tally.accepted += 1
                    tally.locations[i] = response.headers["location"]
                else:
                    assert response.status_code == 503, response.status_code
                    tally.refused += 1

            async def submit_all() -> None:
                async with anyio.create_task_group() as tg:
                    for i in range(count):
                        tg.start_soon(submit, i)
                        await anyio.sleep(0.005)  # a steady stream, not one burst
                submitted.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit_all)
                tg.start_soon(chaos, rig, submitted)

            deadline = VISIBILITY + RESTORE_INTERVAL + 120 + count * 0.1 + seconds
            outcomes, last_final = await collect(client, tally.locations, deadline, limiter)
        if rig.last_fault is not None and last_final is not None:
            tally.recovery = last_final - rig.last_fault
        ledger = redis.Redis.from_url(rig.redis.url)
        store = rig.store()
        keys_seen: dict[str, int] = {}
        for i, response in outcomes.items():
            if response is None:
                tally.lost += 1
                task_id = tally.locations[i].rsplit("/", 1)[1]
                tally.broker_gap += dropped_by_broker(store, task_id)
            elif response.status_code == 200:
                tally.done += 1
                key = response.json()["marked"]
                tally.wrong += key != f"fault-{i}"
                keys_seen[key] = keys_seen.get(key, 0) + 1
            else:
                tally.failed += 1
        tally.wrong += sum(n - 1 for n in keys_seen.values())
        for i in tally.locations:
            tally.reruns += max(0, int(ledger.get(f"fault-{i}") or 0) - 1)
        ledger.close()
        store.close()
    finally:
        for worker in (rig.worker, rig.idle):
            if worker is not None:
                worker.stop()
        rig.redis.stop()
        if rig.sentinels is not None:
            rig.sentinels.stop()
            gc.collect()  # the sockets a cancelled master lookup left behind, collected now
    tally.seconds = time.monotonic() - started
    return tally


def dropped_by_broker(client: redis.Redis, task_id: str) -> bool:
    """A lost task whose record is there, that no worker ever began, and whose message is in
    neither the queue nor kombu's unacked hash: Redis was killed after kombu's BRPOP took the
    message and before kombu wrote it to the unacked hash."""
    if not client.exists(f"async-task-middleware-{task_id}"):
        return False
    if client.exists(f"async-task-middleware-attempts-{task_id}"):
        return False
    needle = task_id.encode()
    held = [*client.lrange("celery", 0, -1), *client.hvals("unacked")]
    return not any(needle in message for message in held)


async def collect(
    client: httpx.AsyncClient,
    locations: dict[int, str],
    deadline: float,
    limiter: anyio.CapacityLimiter,
) -> tuple[dict[int, httpx.Response | None], float | None]:
    """Poll every accepted task until final; None for those still not final at the deadline.
    Also the time the last one became final."""
    outcomes: dict[int, httpx.Response | None] = dict.fromkeys(locations)
    end = time.monotonic() + deadline
    last: list[float] = []

    async def poll(i: int, location: str) -> None:
        while time.monotonic() < end:
            async with limiter:
                response = await client.get(location)
            if response.status_code not in (202, 503):
                outcomes[i] = response
                last.append(time.monotonic())
                return
            await anyio.sleep(0.5)

    async with anyio.create_task_group() as tg:
        for i, location in locations.items():
            tg.start_soon(poll, i, location)
    return outcomes, max(last, default=None)


def rabbitmq_up() -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", 5672)) == 0


def cases(*, long: bool = True) -> list[tuple[str, str]]:
    """The scenarios to run; ``long=False`` leaves out the one that takes five visibility
    timeouts (the test suite checks the same with a 4 s timeout, in tests/e2e/test_runtime.py)."""
    return [
        (name, broker)
        for name, (_, brokers) in SCENARIOS.items()
        for broker in brokers
        if (broker != "rabbitmq" or rabbitmq_up()) and (long or name != LONG)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="fault-injection suite")
    parser.add_argument("--short", action="store_true", help="100 submissions per scenario")
    parser.add_argument("--count", type=int, help="submissions per scenario")
    args = parser.parse_args()
    count = args.count or (100 if args.short else 1000)
    print(f"{count} submissions per scenario, {CONCURRENCY} at a time\n", flush=True)
    print(HEADER, flush=True)
    tallies = []
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for n, (scenario, broker) in enumerate(cases()):
            tally = anyio.run(run, scenario, broker, count, Path(tmp) / str(n))
            tallies.append(tally)
            print(tally.row(), flush=True)
    sys.exit(1 if any(t.lost or t.wrong for t in tallies) else 0)


if __name__ == "__main__":
    main()
