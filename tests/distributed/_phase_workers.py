"""Rank bodies for tests/distributed/test_phases.py (module-level so spawn can pickle them by reference)."""

from __future__ import annotations

import traceback
from typing import Any

from ckptstore.dist import TorchComm, rank_errors, same_error
from ckptstore.errors import DistributedSaveError, IntegrityError, StateMismatchError, UnsupportedValueError


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as e:
        return {
            "type": type(e).__name__,
            "msg": str(e),
            "failed": sorted(getattr(e, "failed_ranks", {}) or {}),
            "step": getattr(e, "step", None),
            "missing": list(getattr(e, "missing", []) or []),
            "tb": "".join(traceback.format_exception(e)),
        }


def _damaged_on_rank1(rank: int) -> int:
    if rank == 1:
        raise IntegrityError("piece 3 of w does not match its crc32c", step=7, key="w")
    return rank


def _mixed(rank: int) -> int:
    if rank == 0:
        raise IntegrityError("piece 3 of w does not match its crc32c", step=7)
    raise StateMismatchError("'w': shape [4] in the state, [8] in the checkpoint", missing=["w"])


def _unstorable_on_rank1(rank: int) -> list[int]:
    if rank == 1:
        raise UnsupportedValueError("cannot store a object at 'oops' without pickle")
    return [rank]


def _write_fails_on_rank1(rank: int) -> int:
    if rank == 1:
        raise OSError(28, "No space left on device (injected)")
    return rank


def _refuse(values: list[Any]) -> Any:
    raise DistributedSaveError("replicas of 'w' differ: ranks 0 vs ranks 1", failed_ranks={1: "holds another 'w'"})


def _pick_step() -> Any:
    raise FileNotFoundError("no such bucket")  # not a ckptstore error: only its name and message travel


def phases(rank: int, world: int) -> dict[str, Any]:
    comm = TorchComm(timeout_seconds=60)
    comm.ensure()
    out: dict[str, Any] = {}
    out["ok"] = _outcome(lambda: comm.run_all("ok phase", lambda: rank * 10, fail=same_error))
    out["damage"] = _outcome(lambda: comm.run_all("damage", lambda: _damaged_on_rank1(rank), fail=same_error))
    out["mixed"] = _outcome(lambda: comm.run_all("mixed", lambda: _mixed(rank), fail=same_error))
    out["decide_ok"] = _outcome(lambda: comm.decide("choice", lambda: [5, 4], fail=same_error))
    out["decide_err"] = _outcome(lambda: comm.decide("choice", _pick_step, fail=same_error))
    plan_fail = rank_errors("step 2 was not saved: preparing the state", own_first=True)
    out["prep"] = _outcome(
        lambda: comm.gather_decide("plan", lambda: _unstorable_on_rank1(rank), lambda xs: xs, fail=plan_fail)
    )
    out["gathered"] = _outcome(
        lambda: comm.gather_decide("plan", lambda: [rank], lambda xs: [x for v in xs for x in v], fail=plan_fail)
    )
    out["refused"] = _outcome(lambda: comm.gather_decide("plan", lambda: rank, _refuse, fail=plan_fail))
    write_fail = rank_errors("step 4 was not committed", "; the previous steps are untouched")
    out["write"] = _outcome(
        lambda: comm.gather_decide(
            "commit", lambda: _write_fails_on_rank1(rank), lambda xs: "committed", fail=write_fail
        )
    )
    out["after"] = _outcome(lambda: comm.run_all("after failures", lambda: "usable", fail=same_error))
    return out
