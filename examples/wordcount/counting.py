"""The word count the endpoints share, reporting its progress on large texts, and a running
count that streams as it goes."""

import asyncio
import json
from collections.abc import AsyncIterator

from async_task_middleware import report_progress

#: Characters counted between two progress reports.
CHUNK = 1024 * 1024


def word_count(text: str) -> int:
    """The number of words in ``text``; a text over a megabyte reports its progress after each
    one (``{"done": characters, "total": characters}``, in the status URL's 202 body and the
    event stream). Outside a worker, ``report_progress`` does nothing."""
    words, start, total = 0, 0, len(text)
    while start < total:
        end = min(start + CHUNK, total)
        while end < total and not text[end].isspace():
            end += 1  # never split a word between two chunks
        words += len(text[start:end].split())
        start = end
        if total > CHUNK:
            report_progress(done=start, total=total)
    return words


#: Lines of the text counted between two lines of the running count.
TALLY_LINES = 1
#: The pause between two lines of the running count: a slow producer, so that the demo
#: shows the lines arriving one by one.
TALLY_PAUSE = 0.1


async def running_count(text: str) -> AsyncIterator[bytes]:
    """NDJSON: after each line of ``text``, ``{"line", "words"}`` (the words so far), then
    ``{"count"}``. The same bytes served in process or relayed live through the queue."""
    words = 0
    for number, line in enumerate(text.splitlines(), 1):
        words += len(line.split())
        yield json.dumps({"line": number, "words": words}).encode() + b"\n"
        await asyncio.sleep(TALLY_PAUSE)
    yield json.dumps({"count": words}).encode() + b"\n"
