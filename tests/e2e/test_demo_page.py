"""The FastAPI example's demo page in a real browser (headless Chromium, driven by Playwright),
clicked as a user would: a file counted with live progress, and a queued task cancelled."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests._servers import RedisServer, Uvicorn

pytestmark = pytest.mark.anyio


async def test_the_page_counts_a_file_with_live_progress(
    browser: object, served_example: str, tmp_path: Path, logdir: Path
) -> None:
    words = 700_000  # about 3.4 MiB: the count reports progress per MiB
    text = tmp_path / "text.txt"
    text.write_text("word " * words)
    page = await browser.new_page()  # type: ignore[attr-defined]
    await page.goto(served_example)
    await page.set_input_files("#file", str(text))
    await page.click("#submit")
    await page.wait_for_selector("#result:not(.hidden)", timeout=30_000)
    assert await page.text_content("#count") == str(words)
    assert await page.text_content("#status") == "done"
    task_id = await page.text_content("#task-id")
    assert task_id is not None
    assert len(task_id) == 36
    await page.screenshot(path=str(logdir / "demo-page-done.png"))


async def test_the_cancel_button_deletes_a_queued_task(
    browser: object, tmp_path: Path, logdir: Path
) -> None:
    # A Redis with no worker: the task stays queued until the button deletes it.
    with RedisServer(logdir / "demo-idle-redis") as idle:
        server = Uvicorn(
            "examples.wordcount.fastapi_app:app",
            {"REDIS_URL": idle.url},
            logdir / "demo-idle-uvicorn.log",
        ).start()
        try:
            text = tmp_path / "text.txt"
            text.write_text("a few words")
            page = await browser.new_page()  # type: ignore[attr-defined]
            await page.goto(server.url)
            await page.set_input_files("#file", str(text))
            await page.click("#submit")
            await page.wait_for_selector("#status:text('queued')", timeout=10_000)
            await page.click("#cancel")
            await page.wait_for_selector("#status:text('cancelled')", timeout=10_000)
            await page.screenshot(path=str(logdir / "demo-page-cancelled.png"))
            task_id = await page.text_content("#task-id")
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.get(f"/words/{task_id}")).status_code == 404
        finally:
            server.stop()


async def test_the_running_count_arrives_line_by_line(
    browser: object, served_example: str, tmp_path: Path, logdir: Path
) -> None:
    """``POST /tally`` streams a line per line of the text, 0.1 s apart: the page shows the
    counts while the task still runs in the worker, not only once it is done."""
    text = tmp_path / "lines.txt"
    text.write_text("".join(f"word {'x ' * i}\n" for i in range(30)))
    page = await browser.new_page()  # type: ignore[attr-defined]
    await page.goto(served_example)
    await page.set_input_files("#file", str(text))
    await page.click("#tally")
    seen: set[str] = set()
    for _ in range(200):
        seen.add(await page.text_content("#tally-lines") or "")
        if (await page.text_content("#tally-status") or "").startswith("done"):
            break
        await page.wait_for_timeout(50)
    assert await page.text_content("#tally-status") == f"done: {30 + sum(range(30))} words"
    assert await page.text_content("#tally-lines") == "30"
    between = {value for value in seen if value not in ("0", "30")}
    assert len(between) >= 5, seen  # lines shown as they came
    await page.screenshot(path=str(logdir / "demo-page-tally.png"))
