"""Clock skew, end to end through the manager: steps saved by machines whose clocks run days ahead or behind.

The unit-level row is ``tests/unit/test_retention.py::test_interval_always_keeps_newest_step_whatever_the_clock``
(random ``created_at`` against a fixed ``now``). Here the manager's own clock (``time.time``, which stamps
``created_at`` and is retention's ``now``) jumps around between real saves on a real root:

- the newest committed step (highest number) always survives retention, is ``latest()`` and restores bit-exact;
- a step stamped in the future does not hold a time bucket forever: it is clamped to "now" and superseded;
- ``keep_last`` keeps the last N by step number whatever the timestamps say.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ckptstore.retention import KeepInterval, KeepLast
from tests.faults.conftest import Backend, assert_state, make_state, zeros_like_state

pytestmark = [pytest.mark.faults]

HOUR = 3600.0
DAY = 86400.0
T0 = 1_700_000_000.0 - 1_700_000_000.0 % HOUR + 60  # one minute into an hour


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    now = {"t": T0}
    monkeypatch.setattr(time, "time", lambda: now["t"])
    return now


def _check_newest(b: Backend, step: int, states: dict[int, Any]) -> list[int]:
    mgr = b.manager()
    steps = mgr.steps()
    assert steps[-1] == step, f"the newest step {step} is gone: {steps}"
    latest = mgr.latest()
    assert latest is not None and latest.step == step
    target = zeros_like_state(states[step])
    assert mgr.restore(target).step == step
    assert_state(target, states[step])
    for s in steps:
        assert_state(mgr.load(s), states[s], f"step {s}")
    return steps


def test_interval_retention_with_skewed_clocks(tmp_path: Path, clock: dict[str, float]) -> None:
    b = Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
    mgr = b.manager(retention=KeepInterval(seconds=HOUR))
    states: dict[int, Any] = {}
    plan = [
        (1, T0),  # hour H
        (2, T0 + 60),  # hour H: supersedes 1
        (3, T0 + 10 * DAY),  # a node whose clock is 10 days ahead: stamped in the future
        (4, T0 + HOUR),  # clock fine again, hour H+1: step 3's "future" stamp is clamped into this hour
        (5, T0 - 30 * DAY),  # a node 30 days behind: every existing step now looks like "the future"
        (6, T0 + 2 * HOUR + 5),  # hour H+2
    ]
    seen: dict[int, list[int]] = {}
    for step, t in plan:
        clock["t"] = t
        states[step] = make_state(step)
        mgr.save(step, states[step], epoch=step)
        assert mgr.info(step).created_at == t
        seen[step] = _check_newest(b, step, states)
    assert seen[2] == [2]
    assert seen[3] == [2, 3]  # 3 is the newest: kept, however wrong its stamp
    assert seen[4] == [2, 4], "the future-stamped step 3 still holds a bucket of its own"
    assert seen[5] == [5], "a clock running behind: every older step collapses into 'now' (the newest wins)"
    assert seen[6] == [5, 6]


def test_keep_last_ignores_timestamps(tmp_path: Path, clock: dict[str, float]) -> None:
    b = Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
    mgr = b.manager(retention=KeepLast(n=2) | KeepInterval(seconds=DAY))
    states: dict[int, Any] = {}
    stamps = [T0, T0 + 365 * DAY, T0 - 365 * DAY, T0 + 5, T0 - 3 * DAY, T0 + 7]
    for step, t in enumerate(stamps, start=1):
        clock["t"] = t
        states[step] = make_state(step)
        mgr.save(step, states[step])
        steps = _check_newest(b, step, states)
        assert {step - 1, step} - {0} <= set(steps), (step, steps)
