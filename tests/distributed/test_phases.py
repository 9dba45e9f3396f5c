"""Cross-rank errors as one mechanism (``Comm.run_all`` / ``decide`` / ``gather_decide``): every rank learns every
failure of a phase in the same collective and raises what the same policy makes of them (real gloo processes)."""

from __future__ import annotations

import pytest

from tests.distributed import _phase_workers as W
from tests.fixtures.dist import run_ranks, values

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def outs() -> list[dict]:
    return values(run_ranks(W.phases, 2, timeout=100))


def test_success_returns_each_ranks_own_result_and_the_decision(outs: list[dict]) -> None:
    assert [o["ok"] for o in outs] == [{"value": 0}, {"value": 10}]
    assert [o["decide_ok"] for o in outs] == [{"value": [5, 4]}] * 2
    assert [o["gathered"] for o in outs] == [{"value": [0, 1]}] * 2
    assert [o["after"] for o in outs] == [{"value": "usable"}] * 2  # a failed phase leaves the group usable


def test_one_ranks_typed_error_is_raised_on_every_rank_naming_it(outs: list[dict]) -> None:
    r0, r1 = (o["damage"] for o in outs)
    assert r0["type"] == r1["type"] == "IntegrityError"
    assert r0["msg"].startswith("rank 1: ") and "crc32c" in r0["msg"] and r0["step"] == 7
    assert not r1["msg"].startswith("rank 1: ") and "_damaged_on_rank1" in r1["tb"]  # its own, with traceback


def test_damage_is_chosen_only_when_every_failure_is_damage(outs: list[dict]) -> None:
    # Rank 0 hit damage (a restore would fall back), rank 1 a mismatch (it must not): both raise the mismatch.
    r0, r1 = (o["mixed"] for o in outs)
    assert r0["type"] == r1["type"] == "StateMismatchError", (r0, r1)
    assert r0["msg"].startswith("rank 1: ") and r0["missing"] == ["w"]


def test_rank0_decision_failure_reaches_every_rank(outs: list[dict]) -> None:
    r0, r1 = (o["decide_err"] for o in outs)
    assert r0["type"] == "FileNotFoundError" and "no such bucket" in r0["msg"]  # rank 0: its own exception
    assert r1["type"] == "DistributedSaveError" and r1["failed"] == [0] and "no such bucket" in r1["msg"]


def test_save_policies(outs: list[dict]) -> None:
    r0, r1 = (o["prep"] for o in outs)
    assert r1["type"] == "UnsupportedValueError"  # own_first: the failing rank sees its own mistake
    assert r0["type"] == "DistributedSaveError" and r0["failed"] == [1] and "rank 1: UnsupportedValueError" in r0["msg"]
    for o in outs:
        assert o["refused"]["type"] == "DistributedSaveError" and o["refused"]["failed"] == [1]  # as raised
        assert "replicas of 'w' differ" in o["refused"]["msg"]
        w = o["write"]
        assert w["type"] == "DistributedSaveError" and w["failed"] == [1], w
        assert w["msg"].startswith("step 4 was not committed: failed on 1 rank(s) (rank 1: OSError: ")
        assert "No space left on device" in w["msg"] and w["msg"].endswith("the previous steps are untouched")
