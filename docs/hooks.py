"""MkDocs hook: the diagrams, drawn as SVG at build time from what they show.

``modules.svg`` lists the package's modules by side, read from its folders, so it cannot drift
from the code; ``sequence.svg`` is the exchange of a submission, a poll and the result, drawn
from ``SEQUENCE`` below. No script draws them in the browser: the site reads offline.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PACKAGE = Path(__file__).resolve().parent.parent / "async_task_middleware"
ACTORS = ("client", "web process (middleware)", "Redis", "Celery worker")
#: (from, to, label): an arrow between two actors' lifelines, or a note on one (from == to).
SEQUENCE = (
    (0, 1, "POST /words (the upload)"),
    (1, 2, "SUBMIT: record + task message, one script"),
    (1, 0, "303 See Other, Location: /words/{id}"),
    (3, 2, "take the message; BEGIN (counts the delivery)"),
    (3, 3, "replay the same request through the same app"),
    (0, 1, "GET /words/{id}"),
    (1, 2, "MGET record, result, meta"),
    (1, 0, "202 Accepted {status: running, progress}"),
    (3, 2, "FINISH: the response, ready to send; a note"),
    (0, 1, "GET /words/{id}"),
    (1, 2, "MGET: the stored response"),
    (1, 0, "200 OK: the endpoint's own response"),
)
FONT = 'font-family="system-ui, sans-serif" font-size="13"'


def sequence_svg() -> str:
    col, top, row = 210, 60, 38
    width, height = col * len(ACTORS), top + row * (len(SEQUENCE) + 1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="submit, worker, status">',
        "<title>A submission, the worker's replay and the status URL</title>",
        '<defs><marker id="arrow" markerWidth="10" markerHeight="8" refX="9" refY="4" '
        'orient="auto"><path d="M0,0 L10,4 L0,8 z" fill="#333"/></marker></defs>',
    ]
    for i, actor in enumerate(ACTORS):
        x = col * i + col // 2
        out.append(
            f'<rect x="{x - 90}" y="8" width="180" height="30" rx="6" fill="#e8eaf6" '
            f'stroke="#3f51b5"/><text x="{x}" y="28" text-anchor="middle" {FONT}>'
            f"{escape(actor)}</text>"
            f'<line x1="{x}" y1="38" x2="{x}" y2="{height - 6}" stroke="#9e9e9e" '
            'stroke-dasharray="4 4"/>'
        )
    for n, (a, b, label) in enumerate(SEQUENCE):
        y = top + row * n + 10
        xa, xb = col * a + col // 2, col * b + col // 2
        if a == b:
            # A note on one lifeline, as wide as its text, kept inside the picture.
            w = 6 * len(label) + 20
            x0 = min(xa - w // 2, width - w - 4)
            out.append(
                f'<rect x="{x0}" y="{y - 16}" width="{w}" height="24" fill="#fff8e1" '
                f'stroke="#ffb300"/><text x="{x0 + w // 2}" y="{y}" text-anchor="middle" '
                f'font-family="system-ui, sans-serif" font-size="11">{escape(label)}</text>'
            )
            continue
        out.append(
            f'<line x1="{xa}" y1="{y}" x2="{xb}" y2="{y}" stroke="#333" '
            'marker-end="url(#arrow)"/>'
            f'<text x="{(xa + xb) // 2}" y="{y - 6}" text-anchor="middle" '
            f'font-family="system-ui, sans-serif" font-size="11">{escape(label)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def modules_svg() -> str:
    sides = {
        "_web: the ASGI process": "_web",
        "_worker: inside Celery": "_worker",
        "_shared: what both build on": "_shared",
    }
    names = {
        title: sorted(p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__")
        for title, folder in sides.items()
    }
    box, line = 250, 17
    tall = max(len(v) for v in list(names.values())[:2]) * line + 40
    shared = len(names["_shared: what both build on"])
    shared_h = ((shared + 2) // 3) * line + 40
    width, height = 2 * box + 80, tall + shared_h + 90
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="modules by side">',
        "<title>The package's modules by side; arrows are the imports allowed</title>",
        '<defs><marker id="arrow" markerWidth="10" markerHeight="8" refX="9" refY="4" '
        'orient="auto"><path d="M0,0 L10,4 L0,8 z" fill="#333"/></marker></defs>',
    ]
    spots = {
        "_web: the ASGI process": (20, 10, box, tall),
        "_worker: inside Celery": (box + 60, 10, box, tall),
        "_shared: what both build on": (20, tall + 70, 2 * box + 40, shared_h),
    }
    for title, (x, y, w, h) in spots.items():
        out.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="#e8eaf6" '
            f'stroke="#3f51b5"/><text x="{x + 12}" y="{y + 22}" {FONT} font-weight="bold">'
            f"{escape(title)}</text>"
        )
        per_row = 3 if title.startswith("_shared") else 1
        for k, name in enumerate(names[title]):
            tx = x + 16 + (k % per_row) * (w // per_row)
            ty = y + 42 + (k // per_row) * line
            out.append(f'<text x="{tx}" y="{ty}" {FONT}>{escape(name)}</text>')
    for x in (20 + box // 2, box + 60 + box // 2):
        out.append(
            f'<line x1="{x}" y1="{tall + 12}" x2="{x}" y2="{tall + 66}" stroke="#333" '
            'stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
    out.append(
        f'<text x="{width // 2}" y="{tall + 44}" text-anchor="middle" {FONT}>'
        "imports (the sides never import each other)</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


def on_files(files: Files, config: Any) -> Files:
    for name, draw in (("sequence.svg", sequence_svg), ("modules.svg", modules_svg)):
        files.append(File.generated(config, f"assets/{name}", content=draw()))
    return files
