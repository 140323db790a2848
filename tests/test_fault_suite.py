"""The short fault-injection suite (100 submissions per scenario): nothing lost, ever.

The long version is ``python3 scripts/dev.py faults``; the README shows its table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import cases, run

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("scenario", "broker"), cases(long=False))
async def test_nothing_lost(scenario: str, broker: str, tmp_path: Path) -> None:
    tally = await run(scenario, broker, 100, tmp_path)
    print(tally.row())
    assert tally.submitted == 100
    assert tally.accepted + tally.refused == 100
    assert tally.accepted > 0
    # Every loss fails the test but one kind: Redis SIGKILLed between kombu's BRPOP and its
    # unacked write drops that message (kombu's gap, an open defect of this library's too, in
    # the README). It can only happen where Redis itself is killed, and at most once a kill.
    if scenario == "Redis SIGKILLed and restarted":
        assert tally.broker_gap <= 1, tally.row()
        assert tally.lost == tally.broker_gap, tally.row()
    else:
        assert tally.lost == 0, tally.row()
    assert tally.wrong == 0, tally.row()
    assert tally.done + tally.failed == tally.accepted
    if broker == "sentinel":
        assert tally.failed == 0, tally.row()  # none stored as a failure by the failover
    if scenario == "no faults":
        assert tally.done == 100
        assert tally.reruns == 0
