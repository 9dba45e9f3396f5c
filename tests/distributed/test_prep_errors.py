"""A rank whose state cannot be prepared (flatten fails) must not leave the others waiting for a timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import _prep_workers as W
from tests.fixtures.dist import run_ranks, values


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_unstorable_value_on_one_rank_fails_every_rank_promptly(tmp_path: Path) -> None:
    res = run_ranks(W.bad_state_on_one_rank, 2, str(tmp_path / "ck"), timeout=150)
    r0, r1 = values(res)
    assert r1["error"] == "UnsupportedValueError" and "allow_pickle" in r1["msg"]
    assert r0["error"] == "DistributedSaveError" and r0["failed"] == [1] and "rank 1" in r0["msg"]
    assert r0["seconds"] < 30 and r1["seconds"] < 30  # far below the 120 s collective timeout
    assert r0["steps"] == r1["steps"] == [1, 3]  # nothing committed for step 2; the job carried on
