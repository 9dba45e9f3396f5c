"""Rank bodies for tests/distributed/test_prep_errors.py (module-level so spawn can pickle them by reference)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ckptstore import CheckpointManager, IOOptions
from ckptstore.errors import DistributedSaveError, UnsupportedValueError


def bad_state_on_one_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    # A long timeout: the point is that the healthy rank hears about the failure at once, not after it.
    mgr = CheckpointManager(root, io=IOOptions(timeout_seconds=120))
    mgr.save(1, {"w": torch.ones(4)})
    state: dict[str, Any] = {"w": torch.full((4,), 2.0)}
    if rank == 1:
        state["oops"] = object()  # not storable without pickle -> fails in flatten() on this rank only
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        mgr.save(2, state)
    except UnsupportedValueError as e:
        out = {"error": "UnsupportedValueError", "msg": str(e)}
    except DistributedSaveError as e:
        out = {"error": "DistributedSaveError", "msg": str(e), "failed": sorted(e.failed_ranks)}
    out["seconds"] = time.perf_counter() - t0
    # The job goes on: the next save on the same manager commits.
    mgr.save(3, {"w": torch.full((4,), 3.0)})
    out["steps"] = mgr.steps()
    return out
