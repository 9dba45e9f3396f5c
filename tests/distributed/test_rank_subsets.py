"""A manager on a subset of the ranks never blocks at construction; a collective not every rank joins fails in
bounded time, naming the ranks that did not come (real gloo processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import _subset_workers as W
from tests.fixtures.dist import run_ranks, values

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def test_manager_on_rank0_alone_reads_and_a_lone_save_fails_in_bounded_time(tmp_path: Path) -> None:
    timeout = 4.0
    outs = values(run_ranks(W.rank0_alone, 2, str(tmp_path / "ck"), timeout, timeout=90))
    r0 = outs[0]
    assert r0["construct_seconds"] < 2.0  # no collective at construction
    assert r0["steps"] == [1] and r0["latest"] == 1
    assert torch.equal(r0["loaded"], torch.full((64,), 1.0))
    assert r0["save"] == "DistributedSaveError", r0
    assert 1 in r0["failed_ranks"] and "never reached" in r0["save_error"], r0["save_error"]
    assert r0["save_seconds"] < 4 * timeout
    assert r0["local_save"] == 7 and r0["local_restore"] == 7
    assert torch.equal(r0["local_value"], torch.full((64,), 7.0))


def test_diverged_replicas_fail_the_save_naming_key_and_ranks(tmp_path: Path) -> None:
    outs = values(run_ranks(W.diverged_replicas, 2, str(tmp_path / "ck"), timeout=120))
    for r in outs:
        assert r["small"] == "DistributedSaveError", r
        assert "'w'" in r["small_error"] and "PerRank" in r["small_error"]
        assert "'same'" not in r["small_error"]
        assert set(r["small_failed"]) == {1}
        assert r["big_sampled"] == "DistributedSaveError" and "'big'" in r["big_sampled_error"]
        assert r["hidden_sample"] == "saved"  # a documented limit of the sampled check
        assert r["hidden_full"] == "DistributedSaveError"
        assert r["per_rank"] == "saved"
        assert r["steps"] == [3, 5]


def test_per_rank_state_at_a_new_world_size_is_an_explicit_outcome(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    values(run_ranks(W.per_rank_save, 2, root, timeout=90))
    outs = values(run_ranks(W.per_rank_restore, 3, root, timeout=90))
    for out in outs:
        # strict (default): every rank refuses, before any rank changed anything
        assert out["strict"] == "StateMismatchError", out
        assert torch.equal(out["w_after_strict"], torch.zeros(4))
        assert torch.equal(out["w"], torch.ones(4))
    assert "no saved PerRank value for rank 2" in outs[2]["strict_error"]
    assert [o["missing"] for o in outs] == [(), (), ("pos",)]
    assert [o["pos"] for o in outs] == [0, 10, -1]  # rank 2 keeps its own value, and is told so
