"""ENOSPC / EIO / EFBIG while saving, EIO while restoring: a typed error, the previous step intact (bit-exact),
retention not run, nothing of the failed attempt left behind — on file:// and s3:// (moto).

Injection: :class:`tests.fixtures.faulty.FaultyStorage` in place of ``mgr.storage`` (an ``OSError`` with that
errno at the N-th write call, after N bytes, at an open/close/commit); EFBIG for real, from the kernel, through
``RLIMIT_FSIZE`` in a child process.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptstore import PendingSave
from ckptstore.errors import CheckpointError, StorageError
from ckptstore.options import MiB
from tests.faults.conftest import Backend, assert_state, make_state, zeros_like_state
from tests.fixtures.faulty import Fault, inject

pytestmark = [pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]

WRITE_FAULTS = {
    # id: (fault, errno)
    "enospc-2nd-write-call": (lambda: Fault("enospc", op="write", nth=2), errno.ENOSPC),
    "eio-after-1.5MiB-mid-buffer": (lambda: Fault("eio", op="write", after_bytes=3 * MiB // 2), errno.EIO),
    "enospc-opening-3rd-file": (lambda: Fault("enospc", op="open_write", nth=3), errno.ENOSPC),
    "eio-at-close-fsync": (lambda: Fault("eio", op="close", nth=2), errno.EIO),
    "eio-at-commit": (lambda: Fault("eio", op="create_exclusive"), errno.EIO),
    "enospc-mid-manifest": (lambda: Fault("enospc", op="create_exclusive", after_bytes=100), errno.ENOSPC),
}


def _spy_retention(mgr: Any) -> list[int]:
    calls: list[int] = []
    orig = mgr.catalog.apply_retention  # retention after a commit: ckptstore.catalog.Catalog.apply_retention

    def spy(policy: Any, committed: int, protect: set[int]) -> Any:
        calls.append(committed)
        return orig(policy, committed, protect)

    mgr.catalog.apply_retention = spy
    return calls


@pytest.mark.parametrize("fault_id", list(WRITE_FAULTS))
def test_write_error_is_typed_previous_step_intact(backend: Backend, fault_id: str) -> None:
    make_fault, code = WRITE_FAULTS[fault_id]
    mgr = backend.manager(retention={"keep_last": 1})
    s1 = make_state(1, big=True)
    mgr.save(1, s1, epoch=1, metrics={"loss": 1.0})
    retention_calls = _spy_retention(mgr)
    fs = inject(mgr, make_fault())

    with pytest.raises(StorageError) as ei:
        mgr.save(2, make_state(2, big=True), epoch=2, metrics={"loss": 0.5})
    e = ei.value
    assert isinstance(e, OSError) and isinstance(e, CheckpointError)
    assert e.errno == code, (e.errno, str(e))
    assert "step 2" in str(e) and "injected" in str(e)
    assert sum(f.fired for f in fs.faults) == 1, "the fault did not fire where intended"
    assert retention_calls == [], "retention ran after a failed save"

    # The previous step is intact and the failed attempt is gone at once (not only after gc).
    fresh = backend.manager()
    assert mgr.steps() == fresh.steps() == [1]
    assert_state(fresh.load(1), s1, "step 1")
    backend.only_committed(fresh, [1])
    assert fresh.gc(min_age_seconds=0) == []

    # The failure did not poison anything: the same step saves now, and retention runs after it.
    fs.clear()
    s2 = make_state(2, big=True)
    res = mgr.save(2, s2, epoch=2)
    assert res.deleted_steps == (1,) and retention_calls == [2]
    assert_state(backend.manager().load(2), s2, "step 2")
    backend.only_committed(mgr, [2])


def test_async_save_write_error_is_typed(backend: Backend) -> None:
    mgr = backend.manager(retention={"keep_last": 1})
    s1 = make_state(1)
    mgr.save(1, s1)
    inject(mgr, Fault("enospc", op="write", nth=1))
    pending = mgr.save(2, make_state(2), blocking=False)
    assert isinstance(pending, PendingSave)
    with pytest.raises(StorageError) as ei:
        pending.wait()
    assert ei.value.errno == errno.ENOSPC
    mgr.close()  # the error was reported already: close() does not raise it again
    fresh = backend.manager()
    assert fresh.steps() == [1]
    assert_state(fresh.load(1), s1)
    backend.only_committed(fresh, [1])


def test_read_error_during_restore_is_typed(backend: Backend) -> None:
    mgr = backend.manager()
    s1, s2 = make_state(1), make_state(2)
    mgr.save(1, s1)
    mgr.save(2, s2)
    fs = inject(mgr, Fault("eio", op="read_into", nth=2))
    target = zeros_like_state(s1)
    with pytest.raises(StorageError) as ei:
        mgr.restore(target)  # an I/O error is not corruption: no silent fall back to step 1
    assert ei.value.errno == errno.EIO and "step 2" in str(ei.value)
    fs.clear()
    assert mgr.restore(target).step == 2
    assert_state(target, s2)
    with pytest.raises(StorageError):
        inject(mgr, Fault("eio", op="read_into"))
        mgr.load(1)


# -- EFBIG from the kernel ------------------------------------------------------------------------------------
CHILD = r"""
import json, resource, signal, sys, torch
from ckptstore import CheckpointManager
from ckptstore.errors import StorageError
from tests.faults.conftest import io_options, make_state

root = sys.argv[1]
mgr = CheckpointManager(root, io=io_options(file_bytes=64 << 20, min_split_bytes=64 << 20))
mgr.save(1, make_state(1))  # ~0.3 MB in one shard file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))
try:
    mgr.save(2, make_state(2, big=True))  # a 6 MiB tensor: the shard file crosses 2 MiB
    out = {"error": None}
except Exception as e:
    out = {"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "errno": getattr(e, "errno", None),
           "message": str(e)}
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_efbig_from_rlimit_fsize(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=100, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "StorageError" and "OSError" in out["mro"], out
    assert out["errno"] == errno.EFBIG, out
    from tests.faults.conftest import Backend

    b = Backend("file", f"file://{root}", None, path=root)
    mgr = b.manager()
    assert mgr.steps() == [1]
    assert_state(mgr.load(1), make_state(1))
    b.only_committed(mgr, [1])  # the 2 MiB torn shard was removed with the failed attempt


def test_failed_cleanup_never_touches_another_writers_files(backend: Backend) -> None:
    """Two managers save the same step; A fails (ENOSPC) and cleans up while B is saving. Before the fix the
    cleanup listed the (still empty) step dir, then removed the whole tree — taking B's files with it, or even
    B's committed step when B finished in between."""
    a, b = backend.manager(), backend.manager()
    s7 = make_state(7)
    events: list[str] = []

    def run_b(ev: Any) -> None:
        # A has listed the step dir (empty: its only file failed to open) and is about to remove the dir:
        # B saves the whole step right now (a descheduled process A makes this window arbitrarily long).
        if ev.rel == "step-000000000007" and not events:
            events.append("b-saves")
            b.save(7, s7)
            events.append("b-committed")

    # Whichever way the cleanup removes the step dir, B's whole save happens right before it.
    inject(
        a,
        Fault("enospc", op="open_write"),
        Fault("call", op="remove_dir", fn=run_b, times=None),
        Fault("call", op="remove_tree", fn=run_b, times=None),
    )
    with pytest.raises(StorageError):
        a.save(7, make_state(70))
    assert events == ["b-saves", "b-committed"]
    fresh = backend.manager()
    assert fresh.steps() == [7]
    assert_state(fresh.load(7), s7)
    backend.only_committed(fresh, [7])


def test_commit_outcome_unknown_but_manifest_landed(backend: Backend) -> None:
    """The commit raised after the manifest was written (an S3 PUT whose answer never came back and whose retries
    failed): the step is committed, so its data must survive the error path — and the save reports success."""
    mgr = backend.manager()
    s3_ = make_state(3)
    inner = mgr.storage
    real_create = inner.create_exclusive

    def create_then_fail(rel: str, data: bytes) -> None:
        real_create(rel, data)
        if rel.endswith("manifest.json"):  # the commit (not the save's lease, also created exclusively)
            raise OSError(errno.EIO, "connection reset after the request was sent (injected)", rel)

    inner.create_exclusive = create_then_fail  # type: ignore[method-assign]
    res = mgr.save(3, s3_)
    assert res.step == 3
    fresh = backend.manager()
    assert fresh.steps() == [3]
    assert_state(fresh.load(3), s3_)
    backend.only_committed(fresh, [3])


RETENTION_FAULTS = {
    # where retention hits EIO: (fault, steps visible right after the save)
    "listing-steps": (lambda: Fault("eio", op="list_dir"), [1, 2]),
    "removing-manifest": (lambda: Fault("eio", op="remove", path="manifest.json"), [1, 2]),
    "removing-data": (lambda: Fault("eio", op="remove_tree"), [2]),
}


@pytest.mark.parametrize("where", list(RETENTION_FAULTS))
def test_retention_io_error_never_fails_a_committed_save(backend: Backend, where: str) -> None:
    """Retention runs after the commit: an I/O error in it is logged, never raised from ``save`` (before the fix
    an error while listing escaped as a raw OSError although the step was committed)."""
    make_fault, visible = RETENTION_FAULTS[where]
    mgr = backend.manager(retention={"keep_last": 1})
    s1, s2, s3_ = make_state(1), make_state(2), make_state(3)
    mgr.save(1, s1)
    fs = inject(mgr)
    orig = mgr.catalog.apply_retention

    def arm(policy: Any, committed: int, protect: set[int]) -> Any:
        fs.add(make_fault())
        try:
            return orig(policy, committed, protect)
        finally:
            fs.clear()

    mgr.catalog.apply_retention = arm
    res = mgr.save(2, s2)
    assert res.step == 2 and res.deleted_steps == ()  # nothing was deleted, and none is claimed
    fresh = backend.manager()
    assert fresh.steps() == visible
    for s in visible:
        assert_state(fresh.load(s), {1: s1, 2: s2}[s], f"step {s}")
    fresh.gc(min_age_seconds=0)  # a step whose manifest went first is garbage now
    backend.only_committed(fresh, visible)
    mgr.catalog.apply_retention = orig
    assert mgr.save(3, s3_).deleted_steps == tuple(s for s in visible if s != 3)
    assert backend.manager().steps() == [3]
    backend.only_committed(mgr, [3])


def test_delete_refused_by_the_storage_is_typed(backend: Backend) -> None:
    mgr = backend.manager()
    mgr.save(1, make_state(1))
    inject(mgr, Fault("eio", op="remove"))
    with pytest.raises(StorageError, match=r"could not be .*deleted") as ei:
        mgr.delete(1)
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.EIO
