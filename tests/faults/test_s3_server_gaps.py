"""Hostile or limited S3 servers, end to end (manager level), on moto and on s3rver (``s3_server``).

- a server that ignores ``If-None-Match`` (s3rver): no two writers of one step may both "commit" — the commit is
  refused with ``UnsupportedStorageError`` unless ``io.s3_single_writer`` (then a single writer works normally);
- a server that trickles its answers: restore and save fail with ``StorageError`` within a bound
  (``io.request_deadline_seconds``), instead of running for hours;
- a missing bucket, rejected credentials: ``steps()``/``restore()``/``load()``/``save()`` raise ``StorageError``
  with errno ``ENOENT`` / ``EACCES`` and a message saying what to check — never a raw ``FileNotFoundError``
  that reads as "no checkpoint yet".
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointError, CheckpointExistsError, StorageError, UnsupportedStorageError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.storage import open_storage
from ckptstore.storage.s3 import PROBE_PREFIX
from ckptstore.transfer import copy_step
from tests.faults.conftest import assert_state, io_options, make_state, zeros_like_state
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.faults, pytest.mark.s3, pytest.mark.timeout(120)]


def _mgr(root: tuple[str, dict[str, Any]], **io: Any) -> CheckpointManager:
    return CheckpointManager(root[0], storage_options=root[1], io=io_options(**io))


def _only_committed(server: S3Server, mgr: CheckpointManager, steps: list[int]) -> None:
    expected = sorted(f"run/{step_dir(s)}/{f}" for s in steps for f in [*mgr.manifest(s).files, MANIFEST_NAME])
    assert server.keys("run/") == expected
    assert server.uploads() == []


# -- a server that ignores If-None-Match -------------------------------------------------------------------------
def test_two_writers_of_one_step_never_both_commit(s3_server: S3Server) -> None:
    """Before: on s3rver both writers got a SaveResult, the second manifest replaced the first, and load()
    returned the other writer's state."""
    a, b = _mgr(s3_server.root), _mgr(s3_server.root)
    s_a, s_b = make_state(1), make_state(2)
    if s3_server.enforces_conditional_put:
        a.save(1, s_a)
        with pytest.raises(CheckpointExistsError):
            b.save(1, s_b)
        assert_state(b.load(1), s_a)
        _only_committed(s3_server, a, [1])
        return
    for mgr, state in ((a, s_a), (b, s_b)):
        with pytest.raises(UnsupportedStorageError) as ei:
            mgr.save(1, state)
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.EOPNOTSUPP
        assert "If-None-Match" in str(ei.value) and "s3_single_writer" in str(ei.value), str(ei.value)
    assert a.steps() == [] and b.steps() == []
    assert s3_server.keys("run/") == []  # the refused attempts' shards were cleaned up, no probe left


def test_the_probe_runs_before_any_shard_is_uploaded(s3_server: S3Server, tmp_path: Path) -> None:
    """Before: the probe ran at the commit, after every shard of the save had been uploaded (on a server that
    ignores If-None-Match, only to be deleted again)."""
    faults = s3_server.faults()
    mgr = _mgr(faults.root)
    if s3_server.enforces_conditional_put:
        mgr.save(1, make_state(1))
    else:
        with pytest.raises(UnsupportedStorageError):
            mgr.save(1, make_state(1))
    writes = [r.path for r in faults.requests if r.method in ("PUT", "POST")]
    probes = [i for i, p in enumerate(writes) if PROBE_PREFIX in p]
    assert len(probes) == 2 and probes == [0, 1], writes  # the probe's two conditional PUTs come first
    if not s3_server.enforces_conditional_put:
        assert len(writes) == 2 and s3_server.keys("run/") == []  # nothing of the save was uploaded
        # The same for a copy into the server (ckptstore cp / mirror).
        local = CheckpointManager(str(tmp_path / "local"))
        local.save(1, make_state(1))
        faults.reset_log()
        with pytest.raises(UnsupportedStorageError):
            copy_step(local.storage, open_storage(*faults.root), 1)
        writes = [r.path for r in faults.requests if r.method in ("PUT", "POST")]
        assert len(writes) == 2 and all(PROBE_PREFIX in p for p in writes), writes


def test_single_writer_mode_round_trip(s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    mgr = _mgr(s3_server.root, s3_single_writer=True)
    s1, s2 = make_state(1, big=True), make_state(2, big=True)  # 6 MiB tensors: multipart uploads
    mgr.save(1, s1, metrics={"loss": 1.0})
    mgr.save(2, s2, metrics={"loss": 0.5})
    with pytest.raises(CheckpointExistsError):  # the check before writing protects this writer's own steps
        mgr.save(2, make_state(3))
    fresh = _mgr(s3_server.root, s3_single_writer=True)
    target = zeros_like_state(s2)
    assert fresh.restore(target).step == 2
    assert_state(target, s2)
    assert_state(fresh.load(1), s1)
    with caplog.at_level("WARNING", logger="ckptstore"):
        fresh.gc(min_age_seconds=0)  # s3rver: no ListMultipartUploads; a warning, not an abort
    if not s3_server.lists_uploads:
        assert any("does not implement ListMultipartUploads" in r.message for r in caplog.records)
    _only_committed(s3_server, fresh, [1, 2])
    fresh.delete(1)
    assert fresh.steps() == [2]
    _only_committed(s3_server, fresh, [2])


# -- a server that trickles ---------------------------------------------------------------------------------------
DEADLINE = 2.0


def _fails_within(fn: Callable[[], Any], bound: float) -> StorageError:
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        fn()
    took = time.monotonic() - t0
    assert took < bound, f"took {took:.1f} s (bound {bound} s)"
    return ei.value


def test_restore_from_a_trickling_server_fails_within_a_bound(s3_server: S3Server) -> None:
    """Before: each byte came long before the socket timeout, so restore() ran for hours (here: until the test's
    timeout)."""
    faults = s3_server.faults()
    opts = {"s3_single_writer": not s3_server.enforces_conditional_put}
    mgr = _mgr(faults.root, **opts)
    s1, s2 = make_state(1), make_state(2)
    mgr.save(1, s1)
    mgr.save(2, s2)
    faults.trickle(methods="GET", interval=0.25, match=lambda r: "/shard-" in r.path)
    fresh = _mgr(faults.root, request_deadline_seconds=DEADLINE, **opts)
    e = _fails_within(lambda: fresh.restore(zeros_like_state(s2)), 4 * DEADLINE + 5)
    assert e.errno == errno.ETIMEDOUT and "io.request_deadline_seconds" in str(e), str(e)
    e = _fails_within(lambda: fresh.load(1), 4 * DEADLINE + 5)
    assert e.errno == errno.ETIMEDOUT
    faults.clear()
    target = zeros_like_state(s2)
    assert fresh.restore(target).step == 2  # nothing was damaged; the same manager reads normally again
    assert_state(target, s2)


def test_save_to_a_trickling_server_fails_within_a_bound(s3_server: S3Server) -> None:
    faults = s3_server.faults()
    opts = {"s3_single_writer": not s3_server.enforces_conditional_put, "request_deadline_seconds": DEADLINE}
    mgr = _mgr(faults.root, **opts)
    s1 = make_state(1)
    mgr.save(1, s1)
    faults.trickle(methods="PUT", interval=0.25, what="all")  # every upload's answer crawls in
    e = _fails_within(lambda: mgr.save(2, make_state(2, big=True)), 4 * DEADLINE + 10)
    assert e.errno == errno.ETIMEDOUT and isinstance(e, CheckpointError), str(e)
    faults.clear()
    fresh = _mgr(faults.root, **opts)
    assert fresh.steps() == [1]
    assert_state(fresh.load(1), s1)
    fresh.gc(min_age_seconds=0)
    if s3_server.lists_uploads:
        _only_committed(s3_server, fresh, [1])
    else:  # s3rver can neither list nor abort multipart uploads: only the objects are checked there
        assert [k for k in s3_server.keys("run/") if not k.startswith(f"run/{step_dir(1)}/")] == []


# -- missing bucket, rejected credentials ---------------------------------------------------------------------------
def _manager_ops(mgr: CheckpointManager) -> dict[str, Callable[[], Any]]:
    s = make_state(1)
    return {
        "steps": mgr.steps,
        "latest": mgr.latest,
        "restore": lambda: mgr.restore(zeros_like_state(s)),
        "restore(step=1)": lambda: mgr.restore(zeros_like_state(s), step=1),
        "load(1)": lambda: mgr.load(1),
        "save": lambda: mgr.save(1, s),
    }


def test_missing_bucket_is_typed_everywhere(s3_server: S3Server) -> None:
    """Before: steps()/restore() raised a raw FileNotFoundError (or CheckpointNotFoundError: "no committed
    step"), which a training script's "except FileNotFoundError: start from scratch" silently swallows."""
    mgr = _mgr(("s3://no-such-bucket/run", s3_server.storage_options))
    for name, op in _manager_ops(mgr).items():
        with pytest.raises(StorageError) as ei:
            op()
        e = ei.value
        assert not isinstance(e, FileNotFoundError), (name, type(e).__mro__)
        assert e.errno == errno.ENOENT, (name, e.errno, str(e))
        assert "bucket 'no-such-bucket' does not exist" in str(e) and "check the bucket name" in str(e), str(e)


def test_rejected_credentials_are_typed_everywhere(s3_server: S3Server) -> None:
    """s3rver checks the access key (InvalidAccessKeyId); moto takes any, so the proxy answers 403
    SignatureDoesNotMatch for it, as AWS does for a wrong secret."""
    if s3_server.name == "s3rver":
        root = (s3_server.url, {**s3_server.storage_options, "key": "AKIAWRONG", "secret": "nope"})
    else:
        faults = s3_server.faults()
        faults.fail_always(403, code="SignatureDoesNotMatch")
        root = faults.root
    mgr = _mgr(root)
    for name, op in _manager_ops(mgr).items():
        with pytest.raises(StorageError) as ei:
            op()
        e = ei.value
        assert isinstance(e, PermissionError) and e.errno == errno.EACCES, (name, type(e).__mro__, str(e))
        assert "check the credentials" in str(e), (name, str(e))
