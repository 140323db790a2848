"""The short fault-injection suite (100 submissions per scenario): nothing lost, ever.

The long version is ``python3 scripts/dev.py faults``; docs/operations.md shows its table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.suite import cases, run

pytestmark = pytest.mark.anyio


def _cases() -> list[object]:
    # A submission's deadline may cancel redis-py while it opens a connection to a sentinel;
    # asyncio leaves that socket to the garbage collector (collected inside ``run``).
    leaky = [
        pytest.mark.filterwarnings("ignore::ResourceWarning"),
        pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    ]
    return [
        pytest.param(scenario, broker, marks=leaky if broker == "sentinel" else [])
        for scenario, broker in cases(long=False)
    ]


@pytest.mark.parametrize(("scenario", "broker"), _cases())
async def test_nothing_lost(scenario: str, broker: str, tmp_path: Path) -> None:
    tally = await run(scenario, broker, 100, tmp_path)
    print(tally.row())
    assert tally.submitted == 100
    assert tally.accepted + tally.refused == 100
    assert tally.accepted > 0
    # Not even a message Redis dropped between kombu's BRPOP and its unacked write: the
    # sweep after the restart or failover pushes it again (``_worker.sweep``).
    assert tally.lost == 0, tally.row()
    assert tally.wrong == 0, tally.row()
    assert tally.done + tally.failed == tally.accepted
    if broker == "sentinel":
        assert tally.failed == 0, tally.row()  # none stored as a failure by the failover
    if scenario == "no faults":
        assert tally.done == 100
        assert tally.reruns == 0
