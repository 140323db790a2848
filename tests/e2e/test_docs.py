"""The documentation as a user meets it: the README's quick start and every page's code run as
written, the site built strictly and opened in a real browser.

A Python block whose first line names a file (``# myproject/main.py: ...``) is a file of the
project the page builds: the test writes the page's files into a package of their own, the
quick start's ``tasks.py`` beside them, and runs them with the commands the pages give (a
Celery worker, uvicorn) against a private Redis, the one address the test changes. Any other
Python block runs alone, in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests._servers import ROOT, RedisServer, Uvicorn, Worker, free_port, wait_for
from tests.conftest import final

pytestmark = pytest.mark.anyio

DOCS = ROOT / "docs"
FRAMEWORKS = ("fastapi", "starlette", "litestar", "quart", "django")
ALICE = {"authorization": "Bearer alice"}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def project_files(text: str) -> dict[str, str]:
    """The blocks of ``text`` that name a file of ``myproject``, by that name."""
    files = {}
    for block in python_blocks(text):
        named = re.match(r"# (myproject/\w+\.py)", block)
        if named:
            files[named[1]] = block
    return files


def quick_start_files() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    return project_files(readme.split("## Quick start for your own app", 1)[1].split("\n## ")[0])


@contextlib.contextmanager
def running(files: dict[str, str], tmp_path: Path, logs: Path) -> Iterator[str]:
    """``files`` as the package ``myproject``, served by uvicorn with its Celery worker and a
    private Redis: the base URL."""
    logs.mkdir(parents=True, exist_ok=True)
    with RedisServer(logs / "redis") as redis_server:
        (tmp_path / "myproject").mkdir()
        (tmp_path / "myproject" / "__init__.py").write_text("")
        for name, text in files.items():
            text = text.replace("redis://localhost:6379/0", redis_server.url)
            (tmp_path / name).write_text(text)
        env = {"PYTHONPATH": str(tmp_path)}
        worker = Worker("myproject.tasks", env, logs / "worker.log").start()
        server = Uvicorn("myproject.main:app", env, logs / "uvicorn.log").start()
        try:
            yield server.url
        finally:
            server.stop()
            worker.stop()


async def test_the_quick_start_runs_as_written(tmp_path: Path, logdir: Path) -> None:
    files = quick_start_files()
    assert set(files) == {"myproject/tasks.py", "myproject/main.py"}
    with running(files, tmp_path, logdir / "quickstart") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/reports", json={"year": 2024}, headers=ALICE)
            assert response.status_code == 303, response.text
            location = response.headers["location"]
            done = await final(client, location, headers=ALICE)
            assert done.status_code == 200
            assert done.json() == {"year": 2024, "total": 42.0}
            paths = (await client.get("/openapi.json")).json()["paths"]
            assert "303" in paths["/reports"]["post"]["responses"]
            assert "/reports/{task_id}" in paths
            bob = {"authorization": "Bearer bob"}
            assert (await client.get(location, headers=bob)).status_code == 404


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_each_framework_guide_runs_as_written(
    framework: str, tmp_path: Path, logdir: Path
) -> None:
    page = project_files((DOCS / "frameworks" / f"{framework}.md").read_text())
    assert set(page) == {"myproject/main.py"}
    files = {**quick_start_files(), **page}
    with running(files, tmp_path, logdir / f"guide-{framework}") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/reports", json={"year": 2024}, headers=ALICE)
            assert response.status_code == 303, response.text
            location = response.headers["location"]
            assert (await client.get(location)).status_code == 404  # not alice: not hers
            done = await final(client, location, headers=ALICE)
            assert done.status_code == 200, done.text
            assert done.json() == {"year": 2024, "total": 42.0}


def test_the_fastapi_guide_is_the_quick_start() -> None:
    guide = project_files((DOCS / "frameworks" / "fastapi.md").read_text())
    assert guide["myproject/main.py"] == quick_start_files()["myproject/main.py"]


def test_the_client_page_runs_against_the_quick_start(tmp_path: Path, logdir: Path) -> None:
    files = project_files((DOCS / "client.md").read_text())
    assert set(files) == {"myproject/client.py"}
    script = tmp_path / "client.py"
    script.write_text(files["myproject/client.py"])
    with running(quick_start_files(), tmp_path, logdir / "client-page") as url:
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "API": url},
            check=False,
        )
    assert done.returncode == 0, done.stderr
    answers = [line for line in done.stdout.splitlines() if line.startswith("200 ")]
    assert answers == ["200 {'year': 2024, 'total': 42.0}"] * 2


def loose_blocks() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for block in python_blocks(page.read_text()):
            if not re.match(r"# myproject/", block):
                found.append((str(page.relative_to(DOCS)), block))
    return found


@pytest.mark.parametrize(("page", "block"), loose_blocks(), ids=lambda v: v[:30])
def test_every_other_python_block_runs(page: str, block: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{page}: {done.stderr}"


def build_site(out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


async def test_the_site_reads_in_a_browser_with_nothing_from_outside(
    browser: object, tmp_path: Path, logdir: Path
) -> None:
    site = build_site(tmp_path / "site")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listens(port), 10, "the site's server")
        page = await browser.new_page()  # type: ignore[attr-defined]
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url))
        await page.goto(f"http://127.0.0.1:{port}/getting-started.html")
        await page.wait_for_load_state("networkidle")
        nav = await page.text_content("nav.md-nav--primary")
        assert nav is not None
        for title in ("Getting started", "Frameworks", "The HTTP protocol", "How it works"):
            assert title in nav
        diagram = page.locator("img[src$='sequence.svg']")
        assert await diagram.count() == 1
        width = await diagram.evaluate("image => image.complete && image.naturalWidth")
        assert width > 0  # the sequence diagram loaded and drew
        await page.screenshot(path=str(logdir / "docs-getting-started.png"), full_page=True)
        outside = [url for url in asked if urlsplit(url).hostname != "127.0.0.1"]
        assert outside == []
        assert len(asked) > 3  # the page's own styles, scripts and pictures were asked for
    finally:
        server.terminate()
        server.wait(10)


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_example_says_plainly_that_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "scripts/dev.py", "example", "--once", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert f"port {port} is taken by another program" in done.stderr
    assert "Traceback" not in done.stderr
