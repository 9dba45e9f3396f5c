"""Per-rank bodies: managers used by a subset of the ranks (run by ``tests.fixtures.dist.run_ranks``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ckptstore import CheckpointManager


def rank0_alone(rank: int, world: int, root: str, timeout: float) -> dict[str, Any]:
    """Both ranks save step 1 together; then rank 0 alone builds a manager, reads, and tries to save."""
    out: dict[str, Any] = {}
    mgr = CheckpointManager(root, io={"timeout_seconds": timeout})
    mgr.save(1, {"w": torch.full((64,), 1.0)})
    mgr.close()
    if rank != 0:
        time.sleep(3 * timeout)  # alive but elsewhere (evaluation, a metrics loop): never joins rank 0's calls
        return out
    t0 = time.perf_counter()
    solo = CheckpointManager(root, io={"timeout_seconds": timeout})  # must not block: no collective
    out["construct_seconds"] = time.perf_counter() - t0
    out["steps"] = solo.steps()
    out["latest"] = solo.latest().step
    out["loaded"] = solo.load(1)["w"]
    t0 = time.perf_counter()
    try:
        solo.save(2, {"w": torch.full((64,), 2.0)})
        out["save"] = "returned"
    except Exception as e:
        out["save"] = type(e).__name__
        out["save_error"] = str(e)
        out["failed_ranks"] = dict(getattr(e, "failed_ranks", {}) or {})
    out["save_seconds"] = time.perf_counter() - t0
    # distributed=False: a manager that never talks to the other ranks saves and restores as one process.
    local = CheckpointManager(root + "-export", distributed=False)
    out["local_save"] = local.save(7, {"w": torch.full((64,), 7.0)}).step
    target = {"w": torch.zeros(64)}
    out["local_restore"] = local.restore(target).step
    out["local_value"] = target["w"]
    return out


def diverged_replicas(rank: int, world: int, root: str) -> dict[str, Any]:
    """Ranks save tensors that are not replicas of each other (without PerRank)."""
    from ckptstore import PerRank

    out: dict[str, Any] = {}
    mgr = CheckpointManager(root, io={"timeout_seconds": 30})

    def attempt(name: str, step: int, state: dict[str, Any], **io: Any) -> None:
        m = mgr if not io else CheckpointManager(root, io={"timeout_seconds": 30, **io})
        try:
            m.save(step, state)
            out[name] = "saved"
        except Exception as e:
            out[name] = type(e).__name__
            out[name + "_error"] = str(e)
            out[name + "_failed"] = dict(getattr(e, "failed_ranks", {}) or {})

    attempt("small", 1, {"w": torch.full((1024,), float(rank)), "same": torch.ones(8)})
    big = torch.zeros(1 << 20)  # 4 MiB: sampled, not read whole
    big[0] = float(rank)  # inside the first sampled block
    attempt("big_sampled", 2, {"big": big})
    hidden = torch.zeros(1 << 20)
    hidden[(1 << 19) + 5000] = float(rank)  # between the sampled blocks
    attempt("hidden_sample", 3, {"big": hidden})
    attempt("hidden_full", 4, {"big": hidden}, verify_replicas="full")
    attempt("per_rank", 5, {"w": PerRank(torch.full((1024,), float(rank))), "same": torch.ones(8)})
    out["steps"] = CheckpointManager(root, distributed=False).steps()
    return out


def per_rank_save(rank: int, world: int, root: str) -> None:
    from ckptstore import PerRank

    mgr = CheckpointManager(root, io={"timeout_seconds": 30})
    mgr.save(1, {"w": torch.ones(4), "pos": PerRank(torch.tensor([rank * 10]))})
    mgr.close()


def per_rank_restore(rank: int, world: int, root: str) -> dict[str, Any]:
    from ckptstore import PerRank

    out: dict[str, Any] = {}
    mgr = CheckpointManager(root, io={"timeout_seconds": 30})
    state = {"w": torch.zeros(4), "pos": PerRank(torch.tensor([-1]))}
    try:
        mgr.restore(state)
        out["strict"] = "restored"
    except Exception as e:
        out["strict"] = type(e).__name__
        out["strict_error"] = str(e)
    out["w_after_strict"] = state["w"].clone()
    info = mgr.restore(state, strict=False)
    out["missing"] = info.missing_per_rank
    out["pos"] = int(state["pos"].value[0])
    out["w"] = state["w"].clone()
    return out
