"""S3 faults end to end (manager level), through the fault-injecting HTTP proxy in front of a real moto server.

- 503/SlowDown bursts while saving and restoring: bounded retries, then success, bit-exact;
- persistent 5xx on uploads, on the commit PUT, on everything: a typed ``StorageError``, no manifest, no
  incomplete multipart upload left, the previous step intact; gc finishes what the failure could not;
- the commit PUT lands but every answer is lost: the step is committed, its data kept;
- truncated GET bodies and connections reset mid-body while restoring: never loaded silently — a retried
  success, or ``IntegrityError``/``ManifestError`` (and ``restore("latest")`` falls back to the previous step).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointError, IntegrityError, ManifestError, StorageError
from ckptstore.format.manifest import MANIFEST_NAME
from tests.faults.conftest import Backend, assert_state, io_options, make_state, zeros_like_state
from tests.fixtures.s3 import ProxiedRequest, S3Faults, _Rule

pytestmark = [pytest.mark.faults, pytest.mark.s3, pytest.mark.timeout(120)]


@pytest.fixture
def proxied(s3_faults: S3Faults, s3_client: Any) -> Backend:
    """The manager talks through the proxy; checks (``files``/``uploads``) go straight to moto."""
    return Backend("s3", s3_faults.url, s3_faults.storage_options, s3_client=s3_client)


def _mgr(b: Backend, **kw: Any) -> CheckpointManager:
    return CheckpointManager(b.url, storage_options=b.opts, io=io_options(), **kw)


def _is_part(r: ProxiedRequest) -> bool:
    return r.method == "PUT" and "uploadId=" in r.query


def _is_manifest_put(r: ProxiedRequest) -> bool:
    return r.method == "PUT" and r.path.endswith(f"/{MANIFEST_NAME}")


def _truncate_gets(faults: S3Faults, n: int, mode: str, path_part: str) -> None:
    """Like ``truncate_next_get``, but only for GETs of objects whose path contains ``path_part`` (the fixture's
    helper also cuts listings, which botocore then retries as unparsable)."""
    rule = _Rule("truncate", n, mode=mode, match=lambda r: r.method == "GET" and path_part in r.path)
    with faults._lock:
        faults._rules.append(rule)


def test_503_bursts_are_retried_then_succeed(proxied: Backend, s3_faults: S3Faults) -> None:
    mgr = _mgr(proxied)
    s1 = make_state(1, big=True)
    s3_faults.fail_next(4, status=503)  # the first requests of the save: existence check, uploads
    mgr.save(1, s1)
    s3_faults.fail_next(3, status=503, match=_is_part)
    s3_faults.fail_next(2, status=503, match=_is_manifest_put)
    s2 = make_state(2, big=True)
    mgr.save(2, s2)
    assert s3_faults.failed == 9
    s3_faults.reset_log()
    s3_faults.fail_next(4, status=503, methods="GET")
    fresh = _mgr(proxied)
    target = zeros_like_state(s2)
    assert fresh.restore(target).step == 2
    assert_state(target, s2)
    assert s3_faults.failed == 4
    assert_state(fresh.load(1), s1)
    proxied.only_committed(fresh, [1, 2])


@pytest.mark.parametrize(
    "where",
    ["parts", "small-puts", "commit", "everything-but-reads"],
)
def test_persistent_5xx_is_typed_and_leaves_nothing(proxied: Backend, s3_faults: S3Faults, where: str) -> None:
    mgr = _mgr(proxied, retention={"keep_last": 1})
    s1 = make_state(1, big=True)
    mgr.save(1, s1)
    if where == "parts":
        s3_faults.fail_always(500, match=_is_part)
    elif where == "small-puts":
        s3_faults.fail_always(503, match=lambda r: r.method == "PUT" and "uploadId=" not in r.query)
    elif where == "commit":
        s3_faults.fail_always(500, match=_is_manifest_put)
    else:  # uploads, aborts and deletes all fail: cleanup is impossible now, gc must do it later
        s3_faults.fail_always(500, methods=["PUT", "POST", "DELETE"])
    with pytest.raises(StorageError) as ei:
        mgr.save(2, make_state(2, big=True))
    e = ei.value
    assert isinstance(e, OSError) and isinstance(e, CheckpointError)
    assert "failed after 5 attempts" in str(e) and "step-000000000002/" in str(e), str(e)
    s3_faults.clear()
    fresh = _mgr(proxied)
    assert fresh.steps() == [1]
    assert not any(f.startswith("step-000000000002/" + MANIFEST_NAME) for f in proxied.files())
    assert_state(fresh.load(1), s1)
    if where != "everything-but-reads":
        proxied.only_committed(fresh, [1])  # cleaned up at once: no shard, no multipart upload left
    fresh.gc(min_age_seconds=0)
    proxied.only_committed(fresh, [1])


def test_commit_answer_lost_on_every_attempt_is_still_committed(proxied: Backend, s3_faults: S3Faults) -> None:
    """The conditional PUT of the manifest lands; the answer and the answers of all 4 retries (412 from moto) are
    replaced by 500. The manager must find its own manifest and report success; never delete the step's data."""
    mgr = _mgr(proxied)
    s1 = make_state(1)
    s3_faults.fail_next(5, status=500, match=_is_manifest_put, after_forward=True)
    res = mgr.save(1, s1)
    assert res.step == 1 and s3_faults.failed == 5
    fresh = _mgr(proxied)
    assert fresh.steps() == [1]
    assert_state(fresh.load(1), s1)
    proxied.only_committed(fresh, [1])


def test_connection_dropped_mid_body_is_retried(proxied: Backend, s3_faults: S3Faults) -> None:
    mgr = _mgr(proxied)
    s1 = make_state(1, big=True)
    mgr.save(1, s1)
    fresh = _mgr(proxied)
    _truncate_gets(s3_faults, 1, "drop", f"/{MANIFEST_NAME}")  # connection closed mid-body
    _truncate_gets(s3_faults, 2, "drop", "/shard-")
    target = zeros_like_state(s1)
    assert fresh.restore(target).step == 1
    assert_state(target, s1)
    assert sum(1 for r in s3_faults.requests if r.injected == "truncate drop") == 3


def test_short_bodies_are_never_loaded_silently(proxied: Backend, s3_faults: S3Faults, caplog: Any) -> None:
    """A GET answered with a consistent but short body (a server returning less than the range asked)."""
    mgr = _mgr(proxied)
    s1, s2 = make_state(1, big=True), make_state(2, big=True)
    mgr.save(1, s1)
    mgr.save(2, s2)
    # The data of step 2 comes back short: IntegrityError for step 2 ...
    fresh = _mgr(proxied)
    _truncate_gets(s3_faults, 1, "short", "/shard-")
    with pytest.raises(IntegrityError) as ei:
        fresh.load(2)
    assert ei.value.step == 2
    # ... and restore("latest") does not load it: it falls back to the previous verified step, bit-exact.
    target = zeros_like_state(s2)
    _truncate_gets(s3_faults, 1, "short", "/shard-")
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert fresh.restore(target).step == 1
    assert_state(target, s1)
    assert any("falling back" in r.message for r in caplog.records)
    # A short manifest body: ManifestError, never a half-read manifest.
    fresh = _mgr(proxied)
    s3_faults.reset_log()
    _truncate_gets(s3_faults, 1, "short", f"/{MANIFEST_NAME}")
    with pytest.raises(ManifestError):
        fresh.load(2)
    gets = [r.injected for r in s3_faults.requests if r.method == "GET" and r.path.endswith(MANIFEST_NAME)]
    assert gets == ["truncate short"], gets  # read once, short, refused: no retry could hide it
    # Nothing was damaged on the server: without faults both steps load bit-exact.
    fresh = _mgr(proxied)
    assert_state(fresh.load(2), s2)
    assert_state(fresh.load(1), s1)
