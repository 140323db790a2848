"""The README's quick start, run as written: its two files in a package of their own, its
worker and server commands, against a private Redis (the one address the test changes)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests._servers import ROOT, RedisServer, Uvicorn, Worker
from tests.conftest import final

pytestmark = pytest.mark.anyio


def quick_start_files() -> dict[str, str]:
    """The quick start's Python blocks, by the file each one names in its first line."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start for your own app", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        named = re.match(r"# (myproject/\w+\.py)", block)
        if named:
            files[named[1]] = block
    return files


async def test_the_quick_start_runs_as_written(tmp_path: Path, logdir: Path) -> None:
    files = quick_start_files()
    assert set(files) == {"myproject/tasks.py", "myproject/main.py"}
    with RedisServer(logdir / "quickstart-redis") as redis_server:
        (tmp_path / "myproject").mkdir()
        (tmp_path / "myproject" / "__init__.py").write_text("")
        for name, text in files.items():
            text = text.replace("redis://localhost:6379/0", redis_server.url)
            (tmp_path / name).write_text(text)
        env = {"PYTHONPATH": str(tmp_path)}
        worker = Worker("myproject.tasks", env, logdir / "quickstart-worker.log").start()
        server = Uvicorn("myproject.main:app", env, logdir / "quickstart-uvicorn.log").start()
        try:
            alice = {"authorization": "Bearer alice"}
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                response = await client.post("/reports", json={"year": 2024}, headers=alice)
                assert response.status_code == 303, response.text
                location = response.headers["location"]
                done = await final(client, location, headers=alice)
                assert done.status_code == 200
                assert done.json() == {"year": 2024, "total": 42.0}
                paths = (await client.get("/openapi.json")).json()["paths"]
                assert "303" in paths["/reports"]["post"]["responses"]
                assert "/reports/{task_id}" in paths
                bob = {"authorization": "Bearer bob"}
                assert (await client.get(location, headers=bob)).status_code == 404
        finally:
            server.stop()
            worker.stop()


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
