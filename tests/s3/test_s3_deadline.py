"""Slow servers: a server that trickles its answer (one byte every fraction of a second) beats every socket
timeout; ``io.request_deadline_seconds`` bounds each request, its retries and bodies included."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator

import numpy as np
import pytest

from ckptstore.errors import StorageError
from ckptstore.options import IOOptions, MiB
from ckptstore.storage.retry import RetryPolicy
from ckptstore.storage.s3 import S3Storage
from tests.fixtures.s3 import S3Faults, S3Server

pytestmark = [pytest.mark.s3, pytest.mark.faults, pytest.mark.timeout(90)]

DEADLINE = 1.5


@pytest.fixture
def faults(s3_server: S3Server) -> S3Faults:
    return s3_server.faults()


@pytest.fixture
def st(faults: S3Faults) -> Iterator[S3Storage]:
    storage = S3Storage(
        *faults.root,
        io=IOOptions(part_bytes=5 * MiB, read_chunk_bytes=MiB, request_deadline_seconds=DEADLINE),
        retry=RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05),
    )
    yield storage
    storage.close()


def _timed_failure(fn: object) -> tuple[StorageError, float]:
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        fn()  # type: ignore[operator]
    return ei.value, time.monotonic() - t0


def test_trickled_get_body_fails_within_the_deadline(st: S3Storage, faults: S3Faults) -> None:
    data = np.random.default_rng(1).integers(0, 256, 3 * MiB, dtype=np.uint8)
    st.write_bytes("slow.bin", data.tobytes())
    # Headers at once, then a byte every 0.2 s: each read returns long before any socket timeout would fire.
    faults.trickle(methods="GET", interval=0.2, match=lambda r: r.path.endswith("/slow.bin"))
    out = np.zeros_like(data)
    e, took = _timed_failure(lambda: st.read_into("slow.bin", 0, [memoryview(out)]))  # 3 parallel ranges
    assert took < DEADLINE + 3, took
    assert e.errno == errno.ETIMEDOUT
    assert "request deadline of 1.5 s" in str(e) and "io.request_deadline_seconds" in str(e), str(e)
    e, took = _timed_failure(lambda: st.read_bytes("slow.bin"))  # one GET of the whole object
    assert took < DEADLINE + 3 and e.errno == errno.ETIMEDOUT, (took, str(e))
    trickled = [r for r in faults.requests if r.injected.startswith("trickle")]
    assert len(trickled) == 4  # not retried: the time is spent
    # The connections the watchdog shut down are not reused: the same storage reads normally afterwards.
    faults.clear()
    st.read_into("slow.bin", 0, [memoryview(out)])
    assert np.array_equal(out, data)


def test_trickled_put_answer_fails_within_the_deadline(st: S3Storage, faults: S3Faults) -> None:
    # The PUT's answer has no body: the status line itself trickles in.
    faults.trickle(methods="PUT", interval=0.2, what="all")
    for name, op in {
        "single PUT": lambda: st.write_bytes("a.bin", b"x" * 1000),
        "multipart": lambda: st.write_bytes("b.bin", bytes(5 * MiB + 1)),
    }.items():
        e, took = _timed_failure(op)
        assert took < DEADLINE + 3, (name, took)
        assert e.errno == errno.ETIMEDOUT and "did not complete within the request deadline" in str(e), str(e)
    faults.clear()
    st.write_bytes("a.bin", b"ok")
    assert st.read_bytes("a.bin") == b"ok"


def test_deadline_bounds_the_retries_too(faults: S3Faults) -> None:
    # 50 attempts with backoff would take ~20 s; the deadline stops them after 1.5 s.
    st = S3Storage(
        *faults.root,
        io=IOOptions(request_deadline_seconds=DEADLINE),
        retry=RetryPolicy(attempts=50, base_delay=0.2, max_delay=0.5),
    )
    faults.fail_always(503)
    e, took = _timed_failure(lambda: st.write_bytes("x", b"1"))
    assert took < DEADLINE + 1, took
    assert "within the request deadline of 1.5 s" in str(e) and "SlowDown" in str(e), str(e)
    assert 2 <= faults.failed < 50
    st.close()
