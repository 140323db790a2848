"""A client for the protocol: send a request to a long-running route, get its final response.

    async with httpx.AsyncClient(base_url="https://api.example") as http:
        response = await run_task(http, "POST", "/words", files={"text": open("a.txt", "rb")})

    response = run_task_sync("POST", "https://api.example/words", files={...})

It sends the request with ``Prefer: wait`` (a task done in time answers at once), follows the
``303`` (or a ``202`` with ``Location``), and then waits for the end: over the event stream when
an ``on_progress`` callback wants each status as it happens and the server offers one, else by
long polls (``Prefer: wait``) that fall back to ``Retry-After`` where the server does not hold
them. The final response is returned as the endpoint sent it, whatever its status; a caller
that gives up (``timeout``, a cancellation, Ctrl-C) deletes the task on the way out.
``submit_task`` sends the request and returns the status URL at once, for a caller that is
called back (``webhook=``: its ``Webhook-URL``) or polls later; ``run_task`` always waits for
the end, so it takes no webhook. ``list_tasks`` goes through the caller's own tasks (the
server's ``tasks_path``); the command line's ``tasks URL`` prints them. ``stream_task`` (and
``run_task(..., stream=True)``) gives the body of a streamed response piece by piece as the
endpoint produces it, resuming with ``Range`` where a connection drops; ``--stream`` on the
command line writes them to stdout as they come.

Needs ``httpx`` (``pip install "async-task-middleware[client]"``; the command line,
``python -m async_task_middleware.client``, also uses ``rich``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Literal, overload

import anyio
import httpx

__all__ = [
    "Progress",
    "TaskTimeout",
    "list_tasks",
    "run_task",
    "run_task_sync",
    "stream_task",
    "submit_task",
]

#: Called with each status body while the task runs: ``{"task_id", "status", "progress"}``.
Progress = Callable[[dict[str, Any]], None]


class TaskTimeout(TimeoutError):
    """The task did not end within ``timeout``; it was deleted (``location`` said where)."""

    def __init__(self, location: str) -> None:
        super().__init__(f"the task at {location} did not end in time; it was deleted")
        self.location = location


@overload
async def run_task(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    wait: int = 30,
    timeout: float | None = None,
    on_progress: Progress | None = None,
    stream: Literal[False] = False,
    **request: Any,
) -> httpx.Response: ...


@overload
async def run_task(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    wait: int = 30,
    stream: Literal[True],
    **request: Any,
) -> AsyncIterator[bytes]: ...


async def run_task(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    wait: int = 30,
    timeout: float | None = None,
    on_progress: Progress | None = None,
    stream: bool = False,
    **request: Any,
) -> httpx.Response | AsyncIterator[bytes]:
    """Send the request; return the task's final response. ``wait``: seconds each long poll
    may be held (the server caps it). ``request``: what ``httpx`` takes (``json=``,
    ``files=``, ``headers=``...). ``stream=True``: the body's pieces instead, as they are
    produced (``stream_task``)."""
    if stream:
        return stream_task(http, method, url, wait=wait, **request)
    headers = httpx.Headers(request.pop("headers", None))
    headers.setdefault("prefer", f"wait={wait}")
    response = await http.request(method, url, headers=headers, **request)
    return await _until_final(http, response, wait, timeout, on_progress)


#: How many times in a row a dropped stream is resumed without a byte coming in between.
RESUMES = 5


async def stream_task(
    http: httpx.AsyncClient, method: str, url: str, *, wait: int = 30, **request: Any
) -> AsyncIterator[bytes]:
    """Send the request and yield the response's body in pieces as the endpoint produces
    them, live through the queue; after a dropped connection, ask again from the byte where
    it stopped (``Range: bytes=N-``), so that the pieces join into the whole body exactly. The
    pieces are the bytes as served (with a ``content-encoding``, the encoded ones: ranges
    count those). A failed task (500), a deleted one (404) or a refusal raises
    ``httpx.HTTPStatusError``. Leaving the loop early leaves the task running: its whole
    response stays at the status URL."""
    headers = httpx.Headers(request.pop("headers", None))
    headers.setdefault("prefer", f"wait={wait}")
    offset, status_url, tries = 0, None, 0
    while True:
        if status_url is None:
            opened = http.stream(method, url, headers=headers, **request)
        else:
            asked = {"prefer": f"wait={wait}", **({"range": f"bytes={offset}-"} if offset else {})}
            opened = http.stream("GET", status_url, headers=asked, timeout=None)
        try:
            async with opened as response:
                following = _location(response)
                if following is not None:  # a 303, or a 202 still: wait on at the status URL
                    status_url = following
                    continue
                if "content-location" in response.headers and status_url is None:
                    status_url = str(response.url.join(response.headers["content-location"]))
                if response.status_code not in (200, 206):
                    await response.aread()
                    response.raise_for_status()
                    return  # another success, served whole
                skip = offset if response.status_code == 200 else 0  # the range was ignored
                async for piece in response.aiter_raw():
                    if skip:
                        piece, skip = piece[skip:], max(0, skip - len(piece))
                    if piece:
                        offset += len(piece)
                        tries = 0
                        yield piece
                return
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            tries += 1
            if status_url is None or tries > RESUMES:
                raise
            # Cut short: the connection dropped, or the task failed or was deleted, which
            # the status URL now tells.
            del exc


async def submit_task(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    webhook: str | None = None,
    webhook_events: str | None = None,
    **request: Any,
) -> str:
    """Send the request and return its status URL at once, without waiting: for a caller
    that is called back (``webhook``: its ``Webhook-URL``; ``webhook_events``: e.g.
    ``"started, completed"``) or polls later. A refusal raises ``httpx.HTTPStatusError``."""
    headers = httpx.Headers(request.pop("headers", None))
    headers["prefer"] = "respond-async"
    if webhook is not None:
        headers["webhook-url"] = webhook
    if webhook_events is not None:
        headers["webhook-events"] = webhook_events
    response = await http.request(method, url, headers=headers, **request)
    location = _location(response)
    if location is None:
        response.raise_for_status()
        raise httpx.HTTPStatusError("no status URL", request=response.request, response=response)
    return location


async def _until_final(
    http: httpx.AsyncClient,
    response: httpx.Response,
    wait: int,
    timeout: float | None,
    on_progress: Progress | None,
) -> httpx.Response:
    location = _location(response)
    if location is None:
        return response  # done within the wait, or refused (4xx, 503): as it is
    try:
        with anyio.fail_after(timeout):
            return await _follow(http, location, wait, on_progress)
    except BaseException as exc:
        # Given up (a timeout, a cancellation, Ctrl-C): the task goes too.
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await http.delete(location)
        if isinstance(exc, TimeoutError):
            raise TaskTimeout(location) from None
        raise


def run_task_sync(method: str, url: str, **options: Any) -> httpx.Response:
    """``run_task`` for code without an event loop, on an ``httpx.AsyncClient`` of its own
    (``client=``: its settings, e.g. ``{"auth": ..., "verify": ...}``)."""
    settings = {"timeout": 60.0, **options.pop("client", {})}

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(**settings) as http:
            response: httpx.Response = await run_task(http, method, url, **options)
            return response

    return anyio.run(main)


def _location(response: httpx.Response) -> str | None:
    if response.status_code in (202, 303) and "location" in response.headers:
        return str(response.url.join(response.headers["location"]))
    return None


async def _follow(
    http: httpx.AsyncClient, location: str, wait: int, on_progress: Progress | None
) -> httpx.Response:
    if on_progress is not None and await _stream(http, location, on_progress):
        return await http.get(location)
    while True:
        response = await http.get(location, headers={"prefer": f"wait={wait}"})
        if response.status_code != 202:
            return response
        if on_progress is not None:
            on_progress(response.json())
        if "preference-applied" not in response.headers:
            await anyio.sleep(float(response.headers.get("retry-after", "1")))


async def _stream(http: httpx.AsyncClient, location: str, on_progress: Progress) -> bool:
    """Follow the event stream to its final event: True; False when the server offers none or
    it ended without one (the caller polls instead)."""
    headers = {"accept": "text/event-stream"}
    async with http.stream("GET", location, headers=headers, timeout=None) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return False
        kind, data = "", ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif not line and kind:
                if kind in ("done", "failed"):
                    return True
                if kind == "status":
                    on_progress(json.loads(data))
                kind, data = "", ""
    return False


# -- the command line ------------------------------------------------------------------------

#: Exit codes: the final response's class, a timeout, and the command line's own errors.
EXIT_OK, EXIT_USAGE, EXIT_TIMEOUT, EXIT_CLIENT_ERROR, EXIT_SERVER_ERROR = 0, 2, 3, 4, 5


async def list_tasks(
    http: httpx.AsyncClient,
    url: str,
    *,
    status: Iterable[str] = (),
    route: str | None = None,
    limit: int = 100,
    **request: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Every task the caller owns at the collection ``url`` (the server's ``tasks_path``),
    newest first, following ``Link: rel=next`` page by page; ``status`` and ``route`` filter
    them. ``request``: what ``httpx`` takes (``headers=`` with the caller's credentials...)."""
    params: list[tuple[str, str | int | float | bool | None]] = [("status", s) for s in status]
    params += [("route", route)] if route else []
    params.append(("limit", str(limit)))
    response = await http.get(url, params=params, **request)
    while True:
        response.raise_for_status()
        for task in response.json()["tasks"]:
            yield task
        following = response.links.get("next", {}).get("url")
        if not following:
            return
        response = await http.get(str(response.url.join(following)), **request)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tasks"]:
        return _tasks(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m async_task_middleware.client",
        description="Send a request to a long-running route and print its final body.",
    )
    parser.add_argument("method")
    parser.add_argument("url")
    parser.add_argument("-F", "--form", action="append", default=[], help="name=value, name=@file")
    parser.add_argument("-d", "--data", help="the body; @file reads it from a file")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--timeout", type=float, help="give up (and delete the task) after S")
    parser.add_argument("--no-wait", action="store_true", help="print the status URL and exit")
    parser.add_argument(
        "--stream", action="store_true", help="write the body to stdout as it is produced"
    )
    parser.add_argument(
        "--webhook", metavar="URL", help="be called back at URL; prints the status URL and exits"
    )
    args = parser.parse_args(argv)
    request: dict[str, Any] = {"headers": dict(_header(h) for h in args.header)}
    data, files = {}, {}
    for field in args.form:
        name, _, value = field.partition("=")
        if value.startswith("@"):
            path = Path(value[1:])
            files[name] = (path.name, path.read_bytes())
        else:
            data[name] = value
    if args.data is not None:
        raw = args.data
        request["content"] = Path(raw[1:]).read_bytes() if raw.startswith("@") else raw.encode()
    elif files or data:
        request.update(files=files or None, data=data or None)
    if args.webhook is not None:
        request["headers"]["webhook-url"] = args.webhook
    if args.no_wait or args.webhook is not None:
        request["headers"]["prefer"] = "respond-async"
        response = httpx.request(args.method, args.url, timeout=60, **request)
        location = _location(response)
        print(location if location is not None else response.text)
        return EXIT_OK if location is not None else _exit_code(response)
    if args.stream:
        return _streamed(args.method, args.url, request)
    from rich.console import Console
    from rich.progress import Progress as Bar

    try:
        with Bar(console=Console(stderr=True), transient=True) as bar:
            response = run_task_sync(
                args.method, args.url, timeout=args.timeout, on_progress=_shown(bar), **request
            )
    except TaskTimeout as exc:
        print(exc, file=sys.stderr)
        return EXIT_TIMEOUT
    sys.stdout.write(response.text + ("" if response.text.endswith("\n") else "\n"))
    return _exit_code(response)


def _streamed(method: str, url: str, request: dict[str, Any]) -> int:
    """``--stream``: each piece to stdout as it comes."""

    async def run() -> int:
        async with httpx.AsyncClient(timeout=60) as http:
            try:
                async for piece in stream_task(http, method, url, **request):
                    sys.stdout.buffer.write(piece)
                    sys.stdout.buffer.flush()
            except httpx.HTTPStatusError as exc:
                sys.stdout.write(exc.response.text + "\n")
                return _exit_code(exc.response)
        return EXIT_OK

    return anyio.run(run)


def _tasks(argv: list[str]) -> int:
    """``tasks URL``: the caller's tasks at the collection URL, one JSON line each."""
    parser = argparse.ArgumentParser(
        prog="python -m async_task_middleware.client tasks",
        description="List your own tasks, newest first, one JSON line each.",
    )
    parser.add_argument("url", help="the server's tasks_path, e.g. http://127.0.0.1:8000/tasks")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--status", action="append", default=[], help="queued, running, ...")
    parser.add_argument("--route", help="e.g. 'POST /words'")
    args = parser.parse_args(argv)
    headers = dict(_header(h) for h in args.header)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            found = list_tasks(
                http, args.url, status=args.status, route=args.route, headers=headers
            )
            async for task in found:
                print(json.dumps(task), flush=True)

    try:
        anyio.run(run)
    except httpx.HTTPStatusError as exc:
        print(exc.response.text, file=sys.stderr)
        return _exit_code(exc.response)
    return EXIT_OK


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


def _exit_code(response: httpx.Response) -> int:
    if response.status_code >= 500:
        return EXIT_SERVER_ERROR
    return EXIT_CLIENT_ERROR if response.status_code >= 400 else EXIT_OK


def _shown(bar: Any) -> Progress:
    """Each status on ``bar`` (a live ``rich`` bar on stderr): the status, and done/total when
    the endpoint reports them."""
    task = bar.add_task("queued", total=None)

    def show(status: dict[str, Any]) -> None:
        progress = status.get("progress") or {}
        done, total = progress.get("done"), progress.get("total")
        numbers = isinstance(done, int | float) and isinstance(total, int | float)
        bar.update(
            task,
            description=str(status.get("status")),
            completed=done if numbers else 0,
            total=total if numbers else None,
        )

    return show


if __name__ == "__main__":
    sys.exit(main())
