"""S3Storage against a real moto server over HTTP: multipart uploads, ranged reads, commit, housekeeping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ckptstore.options import IOOptions, MiB
from ckptstore.storage import open_storage
from ckptstore.storage.retry import RetryPolicy
from ckptstore.storage.s3 import S3Storage
from tests.fixtures.s3 import BUCKET, S3Faults

pytestmark = pytest.mark.s3

PART = 5 * MiB  # the S3 minimum part size keeps multipart tests small


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _storage(root: tuple[str, dict[str, Any]], **io: int) -> S3Storage:
    opts = {"part_bytes": PART, "read_chunk_bytes": 1 * MiB, "max_inflight_bytes": 4 * PART, **io}
    return S3Storage(root[0], root[1], io=IOOptions(**opts), retry=RetryPolicy(base_delay=0.01))


@pytest.fixture
def st(s3_root: tuple[str, dict[str, Any]]) -> Iterator[S3Storage]:
    storage = _storage(s3_root)
    yield storage
    storage.close()


@pytest.fixture
def proxied(s3_faults: S3Faults) -> Iterator[S3Storage]:
    storage = _storage(s3_faults.root)
    yield storage
    storage.close()


def _uploads(client: Any) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=BUCKET).get("Uploads") or [])


def test_open_storage_dispatches_to_s3(s3_root: tuple[str, dict[str, Any]]) -> None:
    st = open_storage(*s3_root)
    assert isinstance(st, S3Storage)
    assert (st.bucket, st.prefix) == (BUCKET, "run")
    assert st.url_of("a/b") == f"s3://{BUCKET}/run/a/b"


def test_multipart_upload_roundtrip(st: S3Storage, s3_client: Any) -> None:
    data = _data(4 * PART + 12_345)
    w = st.open_write("step-1/shard.bin")
    # A small head, then a large buffer: parts straddle buffers and some lie inside one buffer (sent in place).
    w.write([memoryview(data[:1000]), memoryview(data[1000 : 3 * PART])])
    w.write([memoryview(data[3 * PART :])])
    w.close()

    head = s3_client.head_object(Bucket=BUCKET, Key="run/step-1/shard.bin")
    assert head["ContentLength"] == data.nbytes
    assert head["ETag"].strip('"').endswith("-5")  # 5 parts: a multipart upload, not a single PUT
    out = np.zeros_like(data)
    st.read_into("step-1/shard.bin", 0, [memoryview(out)])
    assert np.array_equal(out, data)
    assert _uploads(s3_client) == []
    assert st._budget.used == 0 and st._budget.inflight == 0


def test_small_file_is_single_put(proxied: S3Storage, s3_faults: S3Faults) -> None:
    w = proxied.open_write("small.bin")
    w.write([memoryview(b"abc"), memoryview(b"def")])
    w.close()
    assert proxied.read_bytes("small.bin") == b"abcdef"
    methods = [(r.method, r.query) for r in s3_faults.requests if r.path.endswith("/small.bin")]
    assert methods[0] == ("PUT", "")  # one PutObject, no multipart calls
    assert not any("uploads" in q or "uploadId" in q for _, q in methods)


def test_exact_part_and_empty_files(st: S3Storage) -> None:
    data = _data(PART, seed=3)
    w = st.open_write("exact.bin")
    w.write([memoryview(data)])
    w.close()
    assert st.read_bytes("exact.bin") == data.tobytes()

    w = st.open_write("empty.bin")
    w.close()
    assert st.size("empty.bin") == 0
    assert st.read_bytes("empty.bin") == b""


def test_write_does_not_keep_caller_memory(st: S3Storage) -> None:
    # Once write() returns, the caller may overwrite its buffer; the object must hold the old bytes.
    data = _data(2 * PART + 100, seed=5)
    buf = data.copy()
    w = st.open_write("reuse.bin")
    w.write([memoryview(buf)])
    buf[:] = 0
    w.close()
    assert st.read_bytes("reuse.bin") == data.tobytes()


def test_memory_bound_respected(s3_root: tuple[str, dict[str, Any]]) -> None:
    st = _storage(s3_root, max_inflight_bytes=2 * PART)
    peak = 0
    lock = threading.Lock()
    acquire = st._budget.acquire

    def tracking_acquire(n: int) -> None:
        nonlocal peak
        acquire(n)
        with lock:
            peak = max(peak, st._budget.used)

    st._budget.acquire = tracking_acquire  # type: ignore[method-assign]
    data = _data(6 * PART + 7, seed=1)
    w = st.open_write("bounded.bin")
    for i in range(0, data.nbytes, 1_000_000):  # small writes: everything goes through staging buffers
        w.write([memoryview(data[i : i + 1_000_000])])
    w.close()
    assert peak <= 2 * PART
    assert st.read_bytes("bounded.bin") == data.tobytes()
    st.close()


def test_parallel_writers_and_readers(st: S3Storage) -> None:
    datas = {f"f{i}.bin": _data(2 * PART + i * 1000, seed=10 + i) for i in range(4)}
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            w = st.open_write(f"par/{name}")
            w.write([memoryview(datas[name])])
            w.close()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert st.list_dir("par") == sorted(datas)

    outs = {n: np.zeros_like(d) for n, d in datas.items()}
    readers = [threading.Thread(target=st.read_into, args=(f"par/{n}", 0, [memoryview(outs[n])])) for n in datas]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=120)
    for n, d in datas.items():
        assert np.array_equal(outs[n], d), n


def test_read_into_uses_parallel_ranges(proxied: S3Storage, s3_faults: S3Faults) -> None:
    data = _data(4 * MiB + 10, seed=7)
    proxied.write_bytes("r.bin", data.tobytes())
    s3_faults.reset_log()
    out = np.zeros(4 * MiB, dtype=np.uint8)
    proxied.read_into("r.bin", 10, [memoryview(out[:100]), memoryview(out[100:])])
    assert np.array_equal(out, data[10:])
    gets = [r for r in s3_faults.requests if r.method == "GET"]
    ranges = sorted(r.header("Range") or "" for r in gets)
    assert len(gets) == 4  # read_chunk_bytes = 1 MiB
    assert ranges[0] == "bytes=10-1048585"


def test_abort_multipart(st: S3Storage, s3_client: Any) -> None:
    data = _data(3 * PART, seed=2)
    w = st.open_write("aborted.bin")
    w.write([memoryview(data)])
    assert len(_uploads(s3_client)) == 1
    w.abort()
    w.abort()  # idempotent
    assert _uploads(s3_client) == []
    assert not st.exists("aborted.bin")
    with pytest.raises(ValueError):
        w.write([memoryview(b"x")])
    assert st._budget.used == 0


def test_create_exclusive_is_one_conditional_put(proxied: S3Storage, s3_faults: S3Faults) -> None:
    proxied.create_exclusive("step-1/manifest.json", b"{}")
    with pytest.raises(FileExistsError):
        proxied.create_exclusive("step-1/manifest.json", b"{ }")
    reqs = [r for r in s3_faults.requests if r.path.endswith("/manifest.json")]
    assert [(r.method, r.status) for r in reqs] == [("PUT", 200), ("PUT", 412)]
    assert all(r.header("If-None-Match") == "*" for r in reqs)
    assert not any(r.header("x-amz-copy-source") for r in s3_faults.requests)  # no copy-as-rename
    assert proxied.read_bytes("step-1/manifest.json") == b"{}"


def test_listing_sees_other_writers(st: S3Storage, s3_client: Any) -> None:
    st.write_bytes("step-1/a", b"1")
    assert st.fs.ls(f"{BUCKET}/run/step-1")  # fill s3fs's listing cache
    assert st.list_dir("") == ["step-1"]
    # Another process writes behind our back.
    s3_client.put_object(Bucket=BUCKET, Key="run/step-2/manifest.json", Body=b"{}")
    s3_client.put_object(Bucket=BUCKET, Key="run/step-1/b", Body=b"22")
    assert st.list_dir("") == ["step-1", "step-2"]
    assert st.list_dir("step-1") == ["a", "b"]
    assert st.exists("step-2/manifest.json")
    assert st.size("step-1/b") == 2


def test_list_dir_paginates(
    proxied: S3Storage, s3_faults: S3Faults, s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pages (moto reads this per request) and small delete batches exercise the continuation paths.
    monkeypatch.setenv("MOTO_S3_DEFAULT_MAX_KEYS", "7")
    monkeypatch.setattr("ckptstore.storage.s3._DELETE_BATCH", 10)
    names = [f"k{i:03d}" for i in range(25)]
    for n in names:
        s3_client.put_object(Bucket=BUCKET, Key=f"run/many/{n}", Body=b"")
    assert proxied.list_dir("many") == names
    assert sum(1 for r in s3_faults.requests if r.method == "GET" and "list-type=2" in r.query) == 4
    proxied.remove_tree("many")
    assert sum(1 for r in s3_faults.requests if r.method == "POST" and "delete" in r.query) == 3
    assert proxied.list_dir("many") == []
    assert not proxied.exists("many")


def test_abort_incomplete_uploads(st: S3Storage, s3_client: Any) -> None:
    s3_client.create_multipart_upload(Bucket=BUCKET, Key="run/step-1/x.bin")
    s3_client.create_multipart_upload(Bucket=BUCKET, Key="run/step-10/y.bin")
    s3_client.create_multipart_upload(Bucket=BUCKET, Key="other/z.bin")
    # moto reports every upload as initiated in 2010, so only a huge age keeps them.
    assert st.abort_incomplete_uploads("step-1", older_than_seconds=1e10) == 0
    assert st.abort_incomplete_uploads("step-1") == 1
    assert sorted(u["Key"] for u in _uploads(s3_client)) == ["other/z.bin", "run/step-10/y.bin"]
    assert st.abort_incomplete_uploads("") == 1
    assert [u["Key"] for u in _uploads(s3_client)] == ["other/z.bin"]


def test_non_transient_errors_pass_through(proxied: S3Storage, s3_faults: S3Faults) -> None:
    proxied.write_bytes("x", b"1")
    s3_faults.fail_next(1, status=403)
    with pytest.raises(PermissionError):
        proxied.read_bytes("x")
    assert s3_faults.failed == 1  # not retried
    with pytest.raises(FileNotFoundError):
        proxied.read_bytes("missing")


def test_missing_bucket(s3_root: tuple[str, dict[str, Any]]) -> None:
    # A wrong bucket is a configuration error: it must not look like an empty checkpoint root.
    st = S3Storage("s3://no-such-bucket/x", s3_root[1])
    with pytest.raises(FileNotFoundError):
        st.read_bytes("a")
    with pytest.raises(FileNotFoundError):
        st.list_dir("")


# -- borrow mode: the caller keeps its buffers until close(); nothing is copied ------------------------------
def _borrowed_write(st: S3Storage, rel: str, pieces: list[np.ndarray]) -> None:
    w = st.open_write(rel, borrow=True)
    for p in pieces:
        w.write([memoryview(p)])
    w.close()


def test_borrow_small_object_is_one_put_from_several_buffers(proxied: S3Storage, s3_faults: S3Faults) -> None:
    # A header and tensors, as a shard file is written: under single_put_bytes it is one PutObject.
    pieces = [_data(88, seed=1), _data(3 * MiB + 5, seed=2), _data(2 * MiB, seed=3)]
    st = _storage(s3_faults.root, single_put_bytes=8 * MiB)
    _borrowed_write(st, "one.bin", pieces)
    assert st.read_bytes("one.bin") == b"".join(p.tobytes() for p in pieces)
    reqs = [(r.method, r.query) for r in s3_faults.requests if r.path.endswith("/one.bin")]
    assert reqs[0] == ("PUT", "")
    assert not any("uploads" in q or "uploadId" in q for _, q in reqs)
    assert st._budget.used == 0  # no staging buffer was taken
    st.close()


def test_borrow_large_object_is_multipart_without_staging(s3_root: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    # Parts straddle the caller's buffers (a 1000-byte head first), yet no part buffer is staged.
    data = _data(3 * PART + 777, seed=4)
    st2 = _storage(s3_root, single_put_bytes=PART)
    staged: list[int] = []
    orig_get = st2._buffers.get
    st2._buffers.get = lambda: staged.append(1) or orig_get()  # type: ignore[method-assign]
    _borrowed_write(st2, "big.bin", [data[:1000], data[1000 : 2 * PART], data[2 * PART :]])
    head = s3_client.head_object(Bucket=BUCKET, Key="run/big.bin")
    assert head["ContentLength"] == data.nbytes
    assert head["ETag"].strip('"').endswith("-4")  # 3 full parts + the rest
    assert staged == []
    out = np.zeros_like(data)
    st2.read_into("big.bin", 0, [memoryview(out)])
    assert np.array_equal(out, data)
    assert _uploads(s3_client) == []
    st2.close()


def test_borrow_retry_resends_the_whole_body(s3_faults: S3Faults) -> None:
    # A 503 on the single PUT and on one part: the retried request must send every byte again from the start.
    st = _storage(s3_faults.root, single_put_bytes=PART)
    small = [_data(100, seed=6), _data(PART - 100, seed=7)]
    s3_faults.fail_next(1, 503, code="SlowDown", methods=["PUT"])
    _borrowed_write(st, "small.bin", small)
    assert st.read_bytes("small.bin") == b"".join(p.tobytes() for p in small)

    big = [_data(10, seed=8), _data(2 * PART, seed=9), _data(PART // 2, seed=10)]
    s3_faults.fail_next(1, 503, code="SlowDown", match=lambda r: "partNumber=2" in r.query)
    _borrowed_write(st, "big.bin", big)
    assert st.read_bytes("big.bin") == b"".join(p.tobytes() for p in big)
    assert s3_faults.failed == 2
    st.close()


def test_borrow_failure_aborts_and_leaves_no_object(s3_faults: S3Faults, s3_client: Any) -> None:
    st = _storage(s3_faults.root, single_put_bytes=PART)
    s3_faults.fail_always(500, match=lambda r: "partNumber" in r.query)
    w = st.open_write("broken.bin", borrow=True)
    with pytest.raises(OSError):
        w.write([memoryview(_data(3 * PART, seed=11))])
        w.close()
    s3_faults.clear()
    assert not st.exists("broken.bin")
    assert _uploads(s3_client) == []
    st.close()
