"""Redis as production runs it: Sentinel failover, TLS, ACL users; a Cluster refused at start.

Each test makes its own servers (a master, a replica and three sentinels; a TLS Redis with a
certificate made here; a Redis with ACL users; a cluster-mode node) on free ports.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from celery import Celery
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from async_task_middleware import AsyncTaskMiddleware, ConfigurationError
from async_task_middleware._shared.binding import Binding
from async_task_middleware._web.state import StoreUnavailable, Submission
from async_task_middleware._web.store import TaskStore
from tests._servers import ROOT, RedisServer, Sentinels, Uvicorn, Worker, free_port, wait_for
from tests.conftest import LOCATION, final, make_client

pytestmark = pytest.mark.anyio


def _celery(url: str, **conf: Any) -> Celery:
    app = Celery("production-redis", broker=url, backend=url)
    app.conf.update(accept_content=["json"], **conf)
    return app


def _sentinel_celery(sentinels: Sentinels) -> Celery:
    options = {"master_name": Sentinels.MASTER}
    return _celery(
        sentinels.url,
        broker_transport_options={"visibility_timeout": 60, **options},
        result_backend_transport_options=options,
    )


async def _work(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


def _app(celery_app: Celery, **options: Any) -> AsyncTaskMiddleware:
    return AsyncTaskMiddleware(
        Starlette(routes=[Route("/work", _work, methods=["POST"])]),
        celery_app=celery_app,
        routes=["POST /work"],
        name="production-redis",
        **options,
    )


# --- which deployment is which ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "backend", "fast"),
    [
        ("redis://localhost:6379", "redis://127.0.0.1:6379/0", True),
        ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/0", False),
        ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:6379/0", False),
        (
            "sentinel://127.0.0.1:26380/0;sentinel://127.0.0.1:26379/0",
            "sentinel://127.0.0.1:26379/0;sentinel://127.0.0.1:26380/0",
            True,
        ),
        ("sentinel://127.0.0.1:26379/0", "redis://127.0.0.1:26379/0", False),
        ("amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/0", False),
    ],
)
def test_the_native_publish_compares_deployments_not_url_strings(
    broker: str, backend: str, fast: bool
) -> None:
    app = Celery(broker=broker, backend=backend)
    options = {"master_name": "atm", "confirm_publish": True}
    app.conf.update(broker_transport_options=options, result_backend_transport_options=options)
    assert (Binding.of(app).fast_queue is not None) is fast


def test_sentinel_services_of_another_name_are_another_deployment() -> None:
    url = "sentinel://127.0.0.1:26379/0"
    app = Celery(broker=url, backend=url)
    app.conf.update(
        broker_transport_options={"master_name": "one"},
        result_backend_transport_options={"master_name": "two"},
    )
    assert Binding.of(app).fast_queue is None


def test_a_sentinel_broker_gets_the_visibility_check() -> None:
    from async_task_middleware import register_replay

    url = "sentinel://127.0.0.1:26379/0"
    app = _celery(url, broker_transport_options={"master_name": "m", "visibility_timeout": 30})
    app.conf.result_backend_transport_options = {"master_name": "m"}
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        register_replay(app, {"a": "x:y"}, time_limit=60, leases=False)


def test_the_library_sets_what_a_failover_needs() -> None:
    app = _celery("redis://127.0.0.1:6379/0", result_backend_always_retry=False)
    app.conf.broker_transport_options = {"socket_timeout": 9}
    _app(app)
    assert app.conf.result_backend_always_retry is True
    # The app's own timeout is kept; a missing one is set.
    assert app.conf.broker_transport_options["socket_timeout"] == 9
    assert app.conf.broker_transport_options["socket_connect_timeout"] == 5
    # And the result backend as Celery builds it: no waiting forever, idle links checked.
    assert app.backend.connparams["socket_connect_timeout"] == 5
    assert app.backend.connparams["health_check_interval"] == 25
    assert app.backend.always_retry is True


# --- Sentinel --------------------------------------------------------------------------------


@pytest.fixture
def sentinels(logdir: Path) -> Iterator[Sentinels]:
    with Sentinels(logdir / f"sentinel-{time.monotonic_ns()}") as deployment:
        yield deployment


# A submission's deadline may cancel redis-py while it opens a connection to a sentinel to ask
# for the master; asyncio then leaves that socket to the garbage collector (a ResourceWarning,
# no leak past a collection). Collected here, inside the test, where the warning is expected.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_master_killed_under_submissions_gives_only_503s_then_recovers(
    sentinels: Sentinels,
) -> None:
    """Submissions every 50 ms while the master is SIGKILLed: each is a 303 or a 503 (never
    a hang, never another error), they succeed again within down-after + 3 s of the kill,
    and the tasks accepted before it are still known after the failover."""
    app = _app(_sentinel_celery(sentinels))
    answers: list[tuple[float, int]] = []
    before: list[str] = []
    async with LifespanManager(app), make_client(app) as client:
        for _ in range(10):
            response = await client.post("/work", content=b"before")
            assert response.status_code == 303
            before.append(response.headers["location"])
        # Asynchronous replication: what is written before the kill reaches the replica only
        # if the master had time to send it; wait for that here, it is not what is tested.
        with redis.Redis(port=sentinels.master.port) as master:
            assert master.wait(1, 5000) == 1
        start = time.monotonic()
        killed = start + 1

        async def submit() -> None:
            sent = time.monotonic() - killed
            response = await client.post("/work", content=b"during")
            assert response.status_code in (303, 503), response.text
            if response.status_code == 503:
                assert response.headers["content-type"] == "application/problem+json"
            answers.append((sent, time.monotonic() - killed, response.status_code))

        # One submission every 50 ms, each on its own: a submission retries through the
        # failover until its deadline (publish_timeout, 2 s), so those sent while no master
        # is known wait, and the 503s are those whose deadline ended first.
        async with anyio.create_task_group() as group:
            while time.monotonic() - start < 12:
                if time.monotonic() >= killed and sentinels.master.running:
                    sentinels.master.kill()
                group.start_soon(submit)
                await asyncio.sleep(0.05)
        assert sentinels.master_port() == sentinels.replica.port
        for location in before:
            assert (await client.get(location)).status_code == 202
    gc.collect()
    failed = [(sent, answered) for sent, answered, status in answers if status == 503]
    assert failed, "the kill was not seen: no 503 at all"
    last = max(answered for _, answered in failed)
    print(
        f"{len(failed)} of {len(answers)} submissions 503, sent {min(failed)[0]:.2f} s to "
        f"{max(failed)[0]:.2f} s after the kill; the last 503 at {last:.2f} s"
    )
    assert last < sentinels.down_after_ms / 1000 + 3
    later = [status for sent, _, status in answers if sent > max(failed)[0]]
    assert len(later) >= 50
    assert set(later) == {303}


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1"])
def test_replicas_must_be_a_count(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="replicas"):
        _app(_celery("redis://127.0.0.1:6379/0"), replicas=value)


async def test_a_303_waits_for_the_replicas_asked_for(sentinels: Sentinels) -> None:
    """``replicas=1``: accepted once the replica has it. ``replicas=2`` with one replica:
    a 503 within the deadline, and the task taken back (no record, a tombstone)."""
    celery_app = _sentinel_celery(sentinels)
    replica = redis.Redis(port=sentinels.replica.port)
    for wanted, status in ((1, 303), (2, 503)):
        app = _app(celery_app, replicas=wanted, publish_timeout=1)
        async with LifespanManager(app), make_client(app) as client:
            started = time.monotonic()
            response = await client.post("/work", content=b"x")
            assert response.status_code == status
            assert time.monotonic() - started < 2
            if status == 303:
                task_id = response.headers["location"].rsplit("/", 1)[1]
                assert replica.exists(f"async-task-middleware-{task_id}")
    master = redis.Redis(port=sentinels.master.port)
    records = [
        key
        for key in master.scan_iter("async-task-middleware-*")
        if not key.startswith(
            tuple(b"async-task-middleware-" + part for part in (b"refused-", b"message-"))
        )
    ]
    assert len(records) == 1  # the replicated one; the other was taken back
    assert len(list(master.scan_iter("async-task-middleware-refused-*"))) == 1
    replica.close()
    master.close()


async def test_the_examples_run_on_sentinel_from_the_environment(
    sentinels: Sentinels, logdir: Path
) -> None:
    """The example's worker and web app, given ``REDIS_URL=sentinel://...`` and
    ``REDIS_SENTINEL_MASTER``: word counts before the master dies stay readable after the
    failover, and new ones run on the new master, with neither process restarted. (Tasks
    running while the master dies: the fault suite's Sentinel row.)"""
    env = {"REDIS_URL": sentinels.url, "REDIS_SENTINEL_MASTER": Sentinels.MASTER}
    worker = Worker("examples.wordcount.worker", env, logdir / "sentinel-worker.log").start()
    server = Uvicorn(
        "examples.wordcount.starlette_app:app", env, logdir / "sentinel-uvicorn.log"
    ).start()

    async def count(client: httpx.AsyncClient, words: int) -> str:
        for _ in range(100):  # 503s while no master is known, for a few seconds
            response = await client.post("/words", files={"text": ("t.txt", b"w " * words)})
            if response.status_code == 303:
                location = response.headers["location"]
                assert LOCATION.match(location)
                done = await final(client, location, timeout=60)
                assert done.status_code == 200, done.text
                assert done.json() == {"count": words}
                return location
            assert response.status_code == 503
            await asyncio.sleep(0.2)
        raise AssertionError("no submission accepted after the failover")

    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            before = [await count(client, n) for n in range(1, 6)]
            with redis.Redis(port=sentinels.master.port) as master:
                assert master.wait(1, 5000) == 1
            sentinels.master.kill()
            wait_for(lambda: sentinels.master_port() == sentinels.replica.port, 30, "the failover")
            for n in range(6, 11):
                await count(client, n)
            for n, location in enumerate(before, start=1):
                assert (await client.get(location)).json() == {"count": n}
    finally:
        server.stop()
        worker.stop()


# --- TLS -------------------------------------------------------------------------------------


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls(logdir: Path) -> Iterator[tuple[int, Path]]:
    """A Redis that speaks only TLS: its port and the CA that signed its certificate."""
    ca, cert, key = _certificates(logdir / "tls")
    port = RedisServer(logdir / "unused").port
    server = RedisServer(
        logdir / "tls-redis",
        port=0,
        args=(
            *("--tls-port", str(port), "--tls-cert-file", str(cert)),
            *("--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)),
            *("--tls-auth-clients", "no"),
        ),
        ping_url=f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}",
    )
    with server:
        yield port, ca


def _tls_forms(port: int, ca: Path) -> dict[str, Celery]:
    import ssl

    base = f"rediss://127.0.0.1:{port}/0"
    return {
        "required": _celery(f"{base}?ssl_cert_reqs=required&ssl_ca_certs={ca}"),
        "CERT_REQUIRED": _celery(f"{base}?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={ca}"),
        "redis_backend_use_ssl": _celery(
            f"redis://127.0.0.1:{port}/0",
            redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)},
            broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)},
        ),
    }


@pytest.mark.parametrize("form", ["required", "CERT_REQUIRED", "redis_backend_use_ssl"])
async def test_every_documented_tls_form_reaches_the_store(
    tls: tuple[int, Path], form: str
) -> None:
    port, ca = tls
    celery_app = _tls_forms(port, ca)[form]
    binding = Binding.of(celery_app)
    store = TaskStore(binding, timeout=2, max_connections=4)
    task_id = f"tls-{form}-{time.monotonic_ns()}"
    sub = Submission(task_id, "app", "POST /x", None, None, None)
    try:
        outcome, _ = await store.submit(sub, None, timeout=2)
        assert outcome == 1
        state = await store.read(task_id)
        assert state.record is not None
        assert state.record["route"] == "POST /x"
    finally:
        await store.aclose()


async def test_a_certificate_from_another_ca_is_refused(
    tls: tuple[int, Path], logdir: Path
) -> None:
    port, _ = tls
    other_ca, _, _ = _certificates(logdir / "other-ca")
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={other_ca}"
    store = TaskStore(Binding.of(_celery(url)), timeout=1, max_connections=2)
    try:
        with pytest.raises(StoreUnavailable):
            await store.read("any")
    finally:
        await store.aclose()


async def test_the_word_count_runs_over_tls(tls: tuple[int, Path], logdir: Path) -> None:
    port, ca = tls
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    env = {"REDIS_URL": url}
    worker = Worker("examples.wordcount.worker", env, logdir / "tls-worker.log").start()
    server = Uvicorn("examples.wordcount.fastapi_app:app", env, logdir / "tls-uvicorn.log").start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.post("/words", files={"text": ("t.txt", b"over tls")})
            assert response.status_code == 303
            done = await final(client, response.headers["location"])
            assert done.status_code == 200
            assert done.json() == {"count": 2}
    finally:
        server.stop()
        worker.stop()


# --- Cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_node(logdir: Path) -> Iterator[RedisServer]:
    workdir = logdir / "cluster-node"
    args = (
        *("--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf")),
        *("--cluster-port", str(free_port())),  # else its port + 10,000, maybe past 65,535
    )
    with RedisServer(workdir, args=args) as server:
        yield server


def test_a_cluster_is_refused_at_the_web_side_start(cluster_node: RedisServer) -> None:
    """The middleware answers the lifespan's startup with ``lifespan.startup.failed``: the
    server exits with the reason, instead of serving requests that would all fail."""
    command = [sys.executable, "-m", "uvicorn", "examples.wordcount.starlette_app:app"]
    done = subprocess.run(
        [*command, "--port", str(free_port()), "--lifespan", "on"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": cluster_node.url},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"cluster mode" in done.stderr
    assert b"Sentinel" in done.stderr  # what to use instead


def test_a_cluster_is_refused_at_the_worker_start(cluster_node: RedisServer, logdir: Path) -> None:
    log = logdir / "cluster-worker.log"
    with pytest.raises(RuntimeError, match="exited"):
        Worker("examples.wordcount.worker", {"REDIS_URL": cluster_node.url}, log).start()
    assert "cluster mode" in log.read_text()


# --- ACL users -------------------------------------------------------------------------------

#: The deployment docs' rules: the least a Redis user needs on the web side and on the worker side
#: (the word-count example: Celery's default queue ``celery``, database 0).
WEB_RULES = (
    "resetkeys ~async-task-middleware-* ~celery-task-meta-* ~celery "
    "resetchannels &async-task-middleware-events-* "
    "-@all +hello +auth +ping +client|setname +info +time +mget "
    "+evalsha +eval +script|load +subscribe +unsubscribe +publish "
    "+exists +get +getrange +set +del +expire +lpush +hset +zadd +zrem +zremrangebyscore +zcard"
)
WORKER_RULES = (
    "resetkeys ~async-task-middleware-* ~celery* ~unacked* ~_kombu.* "
    "allchannels "
    "-@all +@connection +@read +@write +@list +@hash +@sortedset +@string +@keyspace "
    "+@pubsub +@scripting +@transaction +info +time -@dangerous +info"
)


async def test_acl_users_with_the_documented_rules_run_the_word_count(logdir: Path) -> None:
    """A web user and a worker user with only the deployment docs' rules: the word count runs end to
    end, and the web user cannot touch what it does not need."""
    with RedisServer(logdir / "acl-redis") as server:
        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "atm-web", "on", ">web-secret", *WEB_RULES.split())
        admin.execute_command(
            "ACL", "SETUSER", "atm-worker", "on", ">worker-secret", *WORKER_RULES.split()
        )
        web_url = f"redis://atm-web:web-secret@127.0.0.1:{server.port}/0"
        worker_url = f"redis://atm-worker:worker-secret@127.0.0.1:{server.port}/0"
        with (
            redis.Redis.from_url(web_url) as web,
            pytest.raises(redis.exceptions.NoPermissionError),
        ):
            web.keys("*")
        worker = Worker(
            "examples.wordcount.worker", {"REDIS_URL": worker_url}, logdir / "acl-worker.log"
        ).start()
        uvicorn = Uvicorn(
            "examples.wordcount.fastapi_app:app", {"REDIS_URL": web_url}, logdir / "acl-web.log"
        ).start()
        try:
            async with httpx.AsyncClient(base_url=uvicorn.url, timeout=30) as client:
                response = await client.post("/words", files={"text": ("t.txt", b"a b c")})
                assert response.status_code == 303, [
                    (e["username"], e["reason"], e["object"], e["client-info"]["cmd"])
                    for e in admin.acl_log()
                ]
                location = response.headers["location"]
                assert (await client.get(location, headers={"prefer": "wait=10"})).json() == {
                    "count": 3
                }
                assert (await client.delete(location)).status_code == 204
        finally:
            uvicorn.stop()
            worker.stop()
        # A large result's body is read in pieces (GETRANGE), as the web user too.
        admin.set(b"async-task-middleware-body-large", b"y" * 600_000)
        store = TaskStore(Binding.of(_celery(web_url)), timeout=2, max_connections=2)
        try:
            pieces = [piece async for piece in store.body("large", 600_000)]
        finally:
            await store.aclose()
        assert len(pieces) > 1
        assert b"".join(pieces) == b"y" * 600_000
        # Nothing refused but the test's own KEYS (the sweep at the worker's start included).
        refused = {(e["username"], e["client-info"]["cmd"]) for e in admin.acl_log()}
        assert refused == {("atm-web", "keys")}, admin.acl_log()
        assert "NOPERM" not in (logdir / "acl-worker.log").read_text()
        assert "NOPERM" not in (logdir / "acl-web.log").read_text()
        admin.close()
