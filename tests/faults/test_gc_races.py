"""gc in another process never takes the files of a save still running, and nothing is committed whose files are
gone; gc and retention never follow a symbolic link out of the root."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ckptstore import CheckpointManager
from ckptstore.errors import StorageError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from tests.faults.conftest import Backend, assert_state, io_options, make_state, zeros_like_state
from tests.fixtures.faulty import Fault, inject

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def test_gc_with_zero_min_age_during_a_slow_save_takes_nothing(backend: Backend) -> None:
    mgr = backend.manager()
    mgr.save(1, make_state(1))
    inject(mgr, Fault("delay", op="write", seconds=0.15, times=None))  # the save takes well over a second
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(res=mgr.save(2, make_state(2))))
    t.start()
    other = backend.manager()  # another process's gc, e.g. a cron `ckptstore gc --min-age 0`
    removed: list[str] = []
    while t.is_alive():
        removed += other.gc(min_age_seconds=0)
        time.sleep(0.05)
    t.join()
    assert removed == []
    assert result["res"].step == 2
    fresh = backend.manager()
    got = zeros_like_state(make_state(2))
    assert fresh.restore(got).step == 2
    assert_state(got, make_state(2))
    backend.only_committed(fresh, [1, 2])  # the lease is gone too


def test_files_removed_before_the_commit_are_never_committed(backend: Backend) -> None:
    mgr = backend.manager(retention={"keep_last": 1})
    mgr.save(1, make_state(1))

    def remove_a_shard(_ev) -> None:
        prefix = step_dir(2)
        shard = next(n for n in mgr.storage.inner.list_dir(prefix) if n.startswith("shard-"))
        mgr.storage.inner.remove(f"{prefix}/{shard}")

    # Right before the commit (rank 0 lists the step's files), another process deletes a finished shard.
    # (the 1st listing of the step's directory is the save's start: which generation to write)
    inject(mgr, Fault("call", op="list_entries", path=step_dir(2), nth=2, fn=remove_a_shard))
    with pytest.raises(StorageError, match="not committed: files written by this save are gone"):
        mgr.save(2, make_state(2))
    fresh = backend.manager()
    assert fresh.steps() == [1]  # nothing committed, and retention did not drop step 1
    got = zeros_like_state(make_state(1))
    assert fresh.restore(got).step == 1
    assert_state(got, make_state(1))


def test_a_stale_lease_does_not_protect_a_dead_save(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), io=io_options())
    mgr.save(1, make_state(1))
    partial = root / step_dir(2)
    partial.mkdir()
    (partial / "shard-dead0000-r0-0.safetensors").write_bytes(b"x" * 100)
    lease = partial / ".saving-dead0000"
    lease.write_bytes(b"{}")
    assert mgr.gc(min_age_seconds=0) == []  # a fresh lease: in progress
    old = time.time() - 3600
    for p in partial.iterdir():
        os.utime(p, (old, old))
    gone = sorted(mgr.gc(min_age_seconds=0))
    assert gone == [f"{step_dir(2)}/.saving-dead0000", f"{step_dir(2)}/shard-dead0000-r0-0.safetensors"]
    assert not partial.exists() and mgr.steps() == [1]


def test_symlinked_step_directories_lead_gc_and_retention_nowhere(tmp_path: Path, caplog) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    for name in ("data.bin", "shard-x-r0-0.safetensors", MANIFEST_NAME):
        (outside / name).write_bytes(b"keep me")
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), io=io_options(), retention={"keep_last": 1})
    mgr.save(1, make_state(1))
    os.symlink(outside, root / step_dir(0))  # looks like the oldest step, points outside the root
    os.symlink(outside / "data.bin", root / step_dir(1) / "stray-link")
    assert mgr.steps() == [1]  # a symlink is not a step
    assert mgr.gc(min_age_seconds=0) == []
    mgr.save(2, make_state(2))  # retention (keep_last=1) runs
    assert mgr.steps() == [2]
    assert sorted(p.name for p in outside.iterdir()) == sorted(["data.bin", "shard-x-r0-0.safetensors", MANIFEST_NAME])
    assert all(p.read_bytes() == b"keep me" for p in outside.iterdir())
    assert any("symbolic link" in r.message for r in caplog.records)
