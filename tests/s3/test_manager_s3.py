"""CheckpointManager on s3:// against a real moto server over HTTP: the same API, the commit rule, tiers, ranks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager, IOOptions
from ckptstore.errors import CheckpointExistsError, IntegrityError
from tests.fixtures.dist import run_ranks, values
from tests.fixtures.s3 import S3Server
from tests.s3 import _mgr_workers as W

pytestmark = pytest.mark.s3


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((300, 100), v), "small": {f"s{i}": torch.arange(5.0) * v for i in range(20)}, "n": v}


def test_round_trip_restore_and_listing(s3_server: S3Server) -> None:
    # On s3rver (no conditional writes) only the declared single-writer mode may commit.
    url, opts = s3_server.root
    io = IOOptions(s3_single_writer=not s3_server.enforces_conditional_put)
    with CheckpointManager(url, storage_options=opts, io=io) as mgr:
        for s in (2, 10, 9):
            mgr.save(s, _state(s), epoch=s, metrics={"loss": 1 / s})
        assert mgr.steps() == [2, 9, 10] and mgr.latest().step == 10 and mgr.best().step == 10
        target = {"w": torch.zeros(300, 100), "small": {f"s{i}": torch.zeros(5) for i in range(20)}, "n": 0.0}
        info = mgr.restore(target)
        assert info.step == 10 and target["n"] == 10 and torch.equal(target["w"], _state(10)["w"])
        out = mgr.load(9)
        assert torch.equal(out["small"]["s3"], _state(9)["small"]["s3"])
        mgr.delete(9)
        assert mgr.steps() == [2, 10]
    # Another process (a fresh manager) sees the same steps.
    assert CheckpointManager(url, storage_options=opts).steps() == [2, 10]
    assert not [k for k in s3_server.keys() if ".ckptstore-probe-" in k]


def test_loading_a_given_step_does_not_list_every_step(s3_faults: Any) -> None:
    url, opts = s3_faults.root
    with CheckpointManager(url, storage_options=opts) as mgr:
        for s in range(1, 6):
            mgr.save(s, _state(s))
    fresh = CheckpointManager(url, storage_options=opts)  # nothing cached
    s3_faults.reset_log()
    assert torch.equal(fresh.load(3)["w"], _state(3)["w"])
    reqs = list(s3_faults.requests)
    lists = [r for r in reqs if "list-type" in r.query or "prefix=" in r.query]
    # No listing of the root: only the step's own directory (its generations), at most twice
    assert lists and all("step-000000000003" in r.query for r in lists) and len(lists) <= 2, lists
    assert len([r for r in reqs if r.method == "HEAD"]) <= 2  # the size check before reading
    fresh.close()


def test_shard_files_are_planned_as_single_puts(s3_faults: Any) -> None:
    # With file_bytes far above single_put_bytes, S3 still gets files of at most half of it: one PUT each.
    from ckptstore import IOOptions

    MiB = 1 << 20
    io = IOOptions(threads=2, file_bytes=512 * MiB, min_split_bytes=MiB, part_bytes=5 * MiB, single_put_bytes=8 * MiB)
    url, opts = s3_faults.root
    state = {f"t{i}": torch.full((MiB // 4,), float(i)) for i in range(24)}  # 24 MiB: 2 files of 12 without the cap
    with CheckpointManager(url, storage_options=opts, io=io) as mgr:
        s3_faults.reset_log()
        res = mgr.save(1, state)
        sizes = mgr.manifest(1).files
        assert res.files >= 3 and len(sizes) == res.files and max(sizes.values()) <= 8 * MiB
        assert not [r for r in s3_faults.requests if "uploads" in r.query or "uploadId" in r.query]
        assert all(torch.equal(v, state[k]) for k, v in mgr.load(1).items())


def test_second_writer_of_a_step_gets_exists_error(s3_root: tuple[str, dict]) -> None:
    url, opts = s3_root
    a = CheckpointManager(url, storage_options=opts)
    b = CheckpointManager(url, storage_options=opts)
    a.save(1, _state(1))
    with pytest.raises(CheckpointExistsError):
        b.save(1, _state(2))
    assert torch.equal(b.load(1)["w"], _state(1)["w"])


def test_bit_flip_on_s3_falls_back_and_names_the_key(s3_root: tuple[str, dict], s3_client: Any) -> None:
    url, opts = s3_root
    mgr = CheckpointManager(url, storage_options=opts)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    p = mgr.manifest(2).tensors["w"].pieces[0]
    key = f"run/step-000000000002/{p.file}"
    bucket = url.split("/")[2]
    body = bytearray(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[p.start + 3] ^= 0x10
    s3_client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(IntegrityError) as ei:
        mgr.load(2)
    assert ei.value.key == "w" and ei.value.step == 2
    target = {"w": torch.zeros(300, 100)}
    assert mgr.restore(target, strict=False).step == 1 and torch.equal(target["w"], _state(1)["w"])


def test_tiered_local_to_s3_and_resume_on_a_new_machine(tmp_path: Path, s3_root: tuple[str, dict]) -> None:
    url, opts = s3_root
    with CheckpointManager(str(tmp_path / "nvme"), mirror=url, mirror_storage_options=opts) as mgr:
        for s in (1, 2):
            mgr.save(s, _state(s))
    assert CheckpointManager(url, storage_options=opts).steps() == [1, 2]  # close() flushed the mirror
    fresh = CheckpointManager(str(tmp_path / "empty-disk"), mirror=url, mirror_storage_options=opts)
    target = {"w": torch.zeros(300, 100), "small": {f"s{i}": torch.zeros(5) for i in range(20)}, "n": 0.0}
    info = fresh.restore(target)
    assert info.step == 2 and info.tier == "mirror" and torch.equal(target["w"], _state(2)["w"])


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_rank_ddp_save_to_s3(s3_root: tuple[str, dict]) -> None:
    url, opts = s3_root
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    res = run_ranks(W.ddp_save_to_s3, 2, url, opts, env, timeout=150)
    r0, r1 = values(res)
    assert r0["step"] == r1["step"] == 7 and r0["same"] and r1["same"] and r0["same_opt"] and r1["same_opt"]
    assert (r0["rank_value"], r1["rank_value"]) == (0, 1)
    m = CheckpointManager(url, storage_options=opts).manifest(7)
    assert m.world_size == 2 and {f.split("-r")[1][0] for f in m.files} == {"0", "1"}  # both ranks wrote
