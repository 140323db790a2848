"""The word count the endpoints share, reporting its progress on large texts."""

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
