"""Read once, broadcast (issue #16 item 5): a DDP restore reads each stored byte once per job, not once per rank.

Real gloo ranks (spawned processes) restore a replicated model + AdamW state from a real moto S3 server behind the
fault proxy on 127.0.0.1, whose request log gives the GETs and their byte ranges. Before: every rank read every
byte (GET bytes per job = world size x the checkpoint)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from ckptstore import CheckpointManager
from tests.distributed import _read_once_workers as W
from tests.fixtures.dist import run_ranks, values
from tests.fixtures.s3 import S3Faults

pytestmark = [pytest.mark.distributed, pytest.mark.s3, pytest.mark.timeout(240)]


def _get_bytes(faults: S3Faults, sizes: dict[str, int]) -> tuple[int, int]:
    """(GET requests, bytes they asked for) on shard files, from the proxy's log."""
    n = total = 0
    for r in faults.requests:
        if r.method != "GET" or "/shard-" not in r.path:
            continue
        n += 1
        rng = r.header("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng or "")
        total += int(m[2]) - int(m[1]) + 1 if m else sizes[r.path.rsplit("/", 1)[1]]
    return n, total


@pytest.mark.parametrize("world", [2, 3])
def test_a_ddp_restore_reads_the_checkpoint_once_per_job(s3_faults: S3Faults, world: int) -> None:
    url, opts = s3_faults.root
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    values(run_ranks(W.save, world, url, opts, env, timeout=150))
    m = CheckpointManager(url, storage_options=opts).manifest(3)
    shard_bytes = sum(e.nbytes for k, e in m.tensors.items() if not k.startswith("rank/"))
    per_rank = sum(e.nbytes for k, e in m.tensors.items() if k.startswith("rank/"))
    got: dict[bool, tuple[int, int]] = {}
    for read_once in (False, True):
        s3_faults.reset_log()
        res: list[dict[str, Any]] = values(run_ranks(W.restore, world, url, opts, env, read_once, timeout=150))
        assert all(r["step"] == 3 and r["same"] and r["same_opt"] for r in res)  # bit-exact on every rank
        assert [r["rank_value"] for r in res] == [[float(i)] * 4 for i in range(world)]
        got[read_once] = _get_bytes(s3_faults, m.files)
    # Every rank reading for itself: world x the replicated bytes (+ each rank's own PerRank value).
    assert got[False][1] == world * shard_bytes + per_rank
    # Read once: the replicated bytes once per job (1.0x), each PerRank value by its rank.
    assert got[True][1] == shard_bytes + per_rank
    assert got[True][0] < got[False][0]


def _corrupt_one_shard(root: Path, step: int) -> None:
    shard = sorted(root.glob(f"step-*{step}/shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))


def test_damage_read_by_one_owner_makes_every_rank_fall_back(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    values(run_ranks(W.save_local, 2, str(root), 1, 1, timeout=120))
    values(run_ranks(W.save_local, 2, str(root), 2, 2, timeout=120))
    _corrupt_one_shard(root, 2)  # read by one owner only: the other rank never sees the bad bytes itself
    res = values(run_ranks(W.restore_local, 2, str(root), None, timeout=120))
    assert [(r["step"], r["same1"]) for r in res] == [(1, True), (1, True)]


def test_a_failed_owner_read_falls_back_to_direct_reads(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    values(run_ranks(W.save_local, 2, str(root), 1, 1, timeout=120))
    values(run_ranks(W.save_local, 2, str(root), 2, 2, timeout=120))
    res = values(run_ranks(W.restore_local, 2, str(root), 1, timeout=120))
    assert [(r["step"], r["same2"]) for r in res] == [(2, True), (2, True)]
