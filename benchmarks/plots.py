"""The benchmark's plots, written beside its table (PNG, matplotlib, the bench extra).

Each function takes what its section measured and writes one picture into ``out``; the docs'
benchmark page shows them. Without matplotlib the benchmark says so once and prints its figures
all the same.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Where the plots go unless ``--plots`` says otherwise: the docs' benchmark page reads them.
OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "bench"
COLOURS = {"baseline": "#9e9e9e", "middleware": "#3f51b5", "ceiling": "#ff9800"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the bench extra has it): no plots", file=sys.stderr)
        return None
    return plt


def _save(plt: Any, fig: Any, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    print(f"plot: {out / name}", flush=True)


def throughput(results: Sequence[tuple[str, Mapping[str, Any]]], out: Path) -> None:
    """Requests a second on each path: the middleware between the seed's hand-written way
    (baseline) and the bare-ASGI ceiling, with the ratio to the ceiling over each bar."""
    plt = _pyplot()
    rows = [(case, figs) for case, figs in results if "ceiling" in figs and "baseline" in figs]
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for k, name in enumerate(("baseline", "middleware", "ceiling")):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        values = [figs[name].rps for _, figs in rows]
        ax.bar(xs, values, width, label=name, color=COLOURS[name])
        if name == "middleware":
            for x, (_, figs) in zip(xs, rows, strict=True):
                ratio = figs["middleware"].vs["ceiling"]
                ax.annotate(
                    f"{ratio:.2f}x",
                    (x, figs["middleware"].rps),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(range(len(rows)), [case for case, _ in rows], fontsize=8)
    ax.set_ylabel("requests / s (median of the rounds)")
    ax.set_title("Throughput: the middleware against the baseline and the ceiling")
    ax.legend(fontsize=8)
    _save(plt, fig, out, "throughput.png")


def drain(rates: Mapping[str, Sequence[float]], out: Path) -> None:
    """Queued word counts a worker drains per second, the replay beside the plain tasks that
    bound it, one dot per round over each median bar."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = list(rates)
    medians = [statistics.median(rates[label]) for label in labels]
    colours = ["#3f51b5" if label == "replay" else "#9e9e9e" for label in labels]
    ax.barh(labels, medians, color=colours)
    for y, label in enumerate(labels):
        ax.plot(rates[label], [y] * len(rates[label]), "k.", markersize=4)
    ax.set_xlabel("tasks / s drained by one worker (bar: median; dots: rounds)")
    ax.set_title("Drain: the replay against plain Celery tasks")
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()
    _save(plt, fig, out, "drain.png")


def io_bound(rows: Mapping[int, tuple[Sequence[float], Sequence[float]]], out: Path) -> None:
    """For each count, seconds from a warm worker's go to the last end of as many queued tasks:
    I/O-bound replays on the replay pool against Celery alone with plain sleeping tasks, per
    round."""
    plt = _pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    counts = sorted(rows)
    width = 0.35
    for k, (label, colour) in enumerate((("replay pool", "#3f51b5"), ("Celery alone", "#9e9e9e"))):
        xs = [i + (k - 0.5) * width for i in range(len(counts))]
        values = [statistics.median(rows[c][k]) for c in counts]
        ax.bar(xs, values, width, label=label, color=colour)
        for x, c in zip(xs, counts, strict=True):
            ax.plot([x] * len(rows[c][k]), rows[c][k], "k.", markersize=4)
    for i, c in enumerate(counts):
        ratio = statistics.median(r / a for r, a in zip(*rows[c], strict=True))
        top = max(max(rows[c][0]), max(rows[c][1]))
        ax.annotate(f"{ratio:.2f}x", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(counts)), [f"{c:,} queued tasks of a 2 s sleep" for c in counts])
    ax.set_ylabel("s from the worker's go to the last end")
    ax.set_title("I/O-bound replays against Celery alone (one worker process)")
    ax.legend(fontsize=8)
    _save(plt, fig, out, "io-bound.png")
