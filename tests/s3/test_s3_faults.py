"""S3 faults through the loopback proxy: 5xx bursts are retried, persistent 5xx become StorageError with nothing
left behind, short or cut bodies are never accepted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ckptstore.errors import StorageError
from ckptstore.options import IOOptions, MiB
from ckptstore.storage.retry import RetryPolicy
from ckptstore.storage.s3 import S3Storage
from tests.fixtures.s3 import BUCKET, ProxiedRequest, S3Faults

pytestmark = [pytest.mark.s3, pytest.mark.faults]

PART = 5 * MiB


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.fixture
def st(s3_faults: S3Faults) -> Iterator[S3Storage]:
    storage = S3Storage(
        *s3_faults.root,
        io=IOOptions(part_bytes=PART, read_chunk_bytes=1 * MiB, max_inflight_bytes=4 * PART),
        retry=RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05),
    )
    yield storage
    storage.close()


def _uploads(client: Any) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=BUCKET).get("Uploads") or [])


def _is_part_upload(r: ProxiedRequest) -> bool:
    return r.method == "PUT" and "uploadId=" in r.query


def test_503_burst_retried_write_and_read(st: S3Storage, s3_faults: S3Faults, s3_client: Any) -> None:
    data = _data(3 * PART + 11)
    s3_faults.fail_next(3, status=503)
    w = st.open_write("burst.bin")
    w.write([memoryview(data)])
    w.close()
    assert s3_faults.failed == 3
    assert _uploads(s3_client) == []

    s3_faults.reset_log()
    s3_faults.fail_next(3, status=503, methods="GET")
    out = np.zeros_like(data)
    st.read_into("burst.bin", 0, [memoryview(out)])
    assert np.array_equal(out, data)
    assert s3_faults.failed == 3


def test_503_burst_on_commit_and_small_put(st: S3Storage, s3_faults: S3Faults) -> None:
    s3_faults.fail_next(3, status=503)
    st.create_exclusive("step-1/manifest.json", b'{"step": 1}')
    s3_faults.fail_next(2, status=500)
    st.write_bytes("small.bin", b"abc")
    assert s3_faults.failed == 5
    assert st.read_bytes("step-1/manifest.json") == b'{"step": 1}'
    assert st.read_bytes("small.bin") == b"abc"


def test_burst_longer_than_attempts_fails(st: S3Storage, s3_faults: S3Faults) -> None:
    s3_faults.fail_next(5, status=503)
    with pytest.raises(StorageError) as ei:
        st.write_bytes("x.bin", b"abc")
    assert s3_faults.failed == 5  # exactly `attempts` tries, then a typed error
    msg = str(ei.value)
    assert "PutObject" in msg and "x.bin" in msg and "SlowDown" in msg
    assert isinstance(ei.value, OSError)


def test_persistent_500_on_parts_leaves_nothing(st: S3Storage, s3_faults: S3Faults, s3_client: Any) -> None:
    s3_faults.fail_always(500, match=_is_part_upload)  # every UploadPart fails; abort (DELETE) still works
    w = st.open_write("doomed.bin")
    with pytest.raises(StorageError, match="UploadPart"):
        w.write([memoryview(_data(3 * PART))])
        w.close()
    w.abort()  # what a caller does after a failure: harmless
    s3_faults.clear()
    assert not st.exists("doomed.bin")
    assert _uploads(s3_client) == []
    assert st._budget.used == 0 and st._budget.inflight == 0


def test_persistent_500_failure_at_close(st: S3Storage, s3_faults: S3Faults, s3_client: Any) -> None:
    # Small writes only stage data; the failure surfaces at close() (CompleteMultipartUpload is a POST).
    data = _data(2 * PART + 5)
    w = st.open_write("late.bin")
    w.write([memoryview(data[: PART // 2])])
    s3_faults.fail_always(500, match=lambda r: r.method == "POST" and "uploadId=" in r.query)
    w.write([memoryview(data[PART // 2 :])])
    with pytest.raises(StorageError, match="CompleteMultipartUpload"):
        w.close()
    s3_faults.clear()
    assert not st.exists("late.bin")
    assert _uploads(s3_client) == []


def test_persistent_500_everywhere_gc_cleans_up(st: S3Storage, s3_faults: S3Faults, s3_client: Any) -> None:
    # Parts and the abort both fail: the upload stays until abort_incomplete_uploads (the GC) removes it.
    s3_faults.fail_always(500, methods=["PUT", "DELETE"])
    w = st.open_write("step-3/shard.bin")
    with pytest.raises(StorageError):
        w.write([memoryview(_data(2 * PART))])
    s3_faults.clear()
    assert len(_uploads(s3_client)) == 1
    assert st.abort_incomplete_uploads("step-3") == 1
    assert _uploads(s3_client) == []
    assert not st.exists("step-3/shard.bin")


def test_persistent_500_on_reads(st: S3Storage, s3_faults: S3Faults) -> None:
    st.write_bytes("r.bin", bytes(100))
    s3_faults.fail_always(500, methods="GET")
    with pytest.raises(StorageError, match="GetObject"):
        st.read_into("r.bin", 0, [memoryview(bytearray(100))])
    with pytest.raises(StorageError):
        st.list_dir("")
    assert s3_faults.failed == 10


def test_truncated_get_is_eof(st: S3Storage, s3_faults: S3Faults) -> None:
    data = _data(300_000, seed=4)
    st.write_bytes("t.bin", data.tobytes())
    s3_faults.truncate_next_get(mode="short")
    with pytest.raises(EOFError):
        st.read_into("t.bin", 0, [memoryview(bytearray(300_000))])
    s3_faults.truncate_next_get(mode="short")
    with pytest.raises(EOFError):
        st.read_bytes("t.bin", 10, 1000)
    assert st.read_bytes("t.bin", 10, 1000) == data[10:1000].tobytes()


def test_dropped_connection_mid_body_is_retried(st: S3Storage, s3_faults: S3Faults) -> None:
    data = _data(2 * MiB + 3, seed=6)
    st.write_bytes("d.bin", data.tobytes())
    s3_faults.truncate_next_get(2, mode="drop")
    out = np.zeros_like(data)
    st.read_into("d.bin", 0, [memoryview(out)])  # two 1 MiB ranges and a tail, two of them cut once
    assert np.array_equal(out, data)
    assert sum(1 for r in s3_faults.requests if r.injected == "truncate drop") == 2


def test_commit_answer_lost_is_still_a_success(st: S3Storage, s3_faults: S3Faults) -> None:
    # The conditional PUT lands, its answer is lost; the retry gets 412 for our own object.
    s3_faults.fail_next(1, status=500, methods="PUT", after_forward=True)
    st.create_exclusive("step-1/manifest.json", b"mine")
    assert st.read_bytes("step-1/manifest.json") == b"mine"
    # Someone else's manifest stays someone else's.
    with pytest.raises(FileExistsError):
        st.create_exclusive("step-1/manifest.json", b"theirs")


def test_complete_answer_lost_is_still_a_success(st: S3Storage, s3_faults: S3Faults, s3_client: Any) -> None:
    data = _data(2 * PART + 1, seed=8)
    s3_faults.fail_next(
        1, status=503, after_forward=True, match=lambda r: r.method == "POST" and "uploadId=" in r.query
    )
    w = st.open_write("c.bin")
    w.write([memoryview(data)])
    w.close()
    assert st.read_bytes("c.bin") == data.tobytes()
    assert _uploads(s3_client) == []
