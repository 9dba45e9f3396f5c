"""S3Storage against real servers over HTTP: multipart uploads, ranged reads, commit, housekeeping.

The storage contract runs on moto and on s3rver (``s3_server`` is parametrised); moto-only rows use features
s3rver lacks (``ListMultipartUploads``, moto's page-size knob), and s3rver's gaps have rows of their own.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ckptstore.errors import StorageError, UnsupportedStorageError
from ckptstore.options import IOOptions, MiB
from ckptstore.storage import open_storage
from ckptstore.storage.retry import RetryPolicy
from ckptstore.storage.s3 import PROBE_PREFIX, S3Storage
from tests.fixtures.s3 import BUCKET, S3Faults, S3Server

pytestmark = pytest.mark.s3

PART = 5 * MiB  # the S3 minimum part size keeps multipart tests small


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _storage(root: tuple[str, dict[str, Any]], **io: Any) -> S3Storage:
    opts = {"part_bytes": PART, "read_chunk_bytes": 1 * MiB, "max_inflight_bytes": 4 * PART, **io}
    return S3Storage(root[0], root[1], io=IOOptions(**opts), retry=RetryPolicy(base_delay=0.01))


@pytest.fixture
def st(s3_server: S3Server) -> Iterator[S3Storage]:
    storage = _storage(s3_server.root)
    yield storage
    storage.close()


@pytest.fixture
def faults(s3_server: S3Server) -> S3Faults:
    """The fault proxy in front of the server of this test (moto or s3rver)."""
    return s3_server.faults()


@pytest.fixture
def proxied(faults: S3Faults) -> Iterator[S3Storage]:
    storage = _storage(faults.root)
    yield storage
    storage.close()


def _uploads(client: Any) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=BUCKET).get("Uploads") or [])


def _moto_storage(root: tuple[str, dict[str, Any]]) -> Iterator[S3Storage]:
    storage = _storage(root)
    yield storage
    storage.close()


@pytest.fixture
def moto_st(s3_root: tuple[str, dict[str, Any]]) -> Iterator[S3Storage]:
    """Moto only (rows that need a feature s3rver lacks)."""
    yield from _moto_storage(s3_root)


@pytest.fixture
def moto_proxied(s3_faults: S3Faults) -> Iterator[S3Storage]:
    yield from _moto_storage(s3_faults.root)


def test_open_storage_dispatches_to_s3(s3_root: tuple[str, dict[str, Any]]) -> None:
    st = open_storage(*s3_root)
    assert isinstance(st, S3Storage)
    assert (st.bucket, st.prefix) == (BUCKET, "run")
    assert st.url_of("a/b") == f"s3://{BUCKET}/run/a/b"


def test_multipart_upload_roundtrip(proxied: S3Storage, faults: S3Faults, s3_server: S3Server) -> None:
    st = proxied
    data = _data(4 * PART + 12_345)
    w = st.open_write("step-1/shard.bin")
    # A small head, then a large buffer: parts straddle buffers and some lie inside one buffer (sent in place).
    w.write([memoryview(data[:1000]), memoryview(data[1000 : 3 * PART])])
    w.write([memoryview(data[3 * PART :])])
    w.close()

    head = s3_server.client.head_object(Bucket=BUCKET, Key="run/step-1/shard.bin")
    assert head["ContentLength"] == data.nbytes
    parts = sorted(r.query for r in faults.requests if r.method == "PUT" and "partNumber=" in r.query)
    assert len(parts) == 5  # 5 parts: a multipart upload, not a single PUT
    if s3_server.name == "moto":
        assert head["ETag"].strip('"').endswith("-5")
    out = np.zeros_like(data)
    st.read_into("step-1/shard.bin", 0, [memoryview(out)])
    assert np.array_equal(out, data)
    assert s3_server.uploads() == []
    assert st._budget.used == 0 and st._budget.inflight == 0


def test_small_file_is_single_put(proxied: S3Storage, faults: S3Faults) -> None:
    w = proxied.open_write("small.bin")
    w.write([memoryview(b"abc"), memoryview(b"def")])
    w.close()
    assert proxied.read_bytes("small.bin") == b"abcdef"
    methods = [(r.method, r.query) for r in faults.requests if r.path.endswith("/small.bin")]
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


def test_memory_bound_respected(s3_server: S3Server) -> None:
    st = _storage(s3_server.root, max_inflight_bytes=2 * PART)
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


def test_read_into_uses_parallel_ranges(proxied: S3Storage, faults: S3Faults) -> None:
    data = _data(4 * MiB + 10, seed=7)
    proxied.write_bytes("r.bin", data.tobytes())
    faults.reset_log()
    out = np.zeros(4 * MiB, dtype=np.uint8)
    proxied.read_into("r.bin", 10, [memoryview(out[:100]), memoryview(out[100:])])
    assert np.array_equal(out, data[10:])
    gets = [r for r in faults.requests if r.method == "GET"]
    ranges = sorted(r.header("Range") or "" for r in gets)
    assert len(gets) == 4  # read_chunk_bytes = 1 MiB
    assert ranges[0] == "bytes=10-1048585"


def test_abort_multipart(st: S3Storage, s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    data = _data(3 * PART, seed=2)
    w = st.open_write("aborted.bin")
    w.write([memoryview(data)])
    assert s3_server.uploads() == ["run/aborted.bin"]
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        w.abort()
        w.abort()  # idempotent
    if s3_server.name == "s3rver":
        # s3rver answers AbortMultipartUpload with 405: the parts stay on the server, with one warning.
        assert s3_server.uploads() == ["run/aborted.bin"]
        assert [r.message for r in caplog.records if "AbortMultipartUpload" in r.message]
    else:
        assert s3_server.uploads() == []
    assert not st.exists("aborted.bin")
    with pytest.raises(ValueError):
        w.write([memoryview(b"x")])
    assert st._budget.used == 0


def test_create_exclusive_is_one_conditional_put(moto_proxied: S3Storage, s3_faults: S3Faults) -> None:
    proxied = moto_proxied
    proxied.create_exclusive("step-1/manifest.json", b"{}")
    with pytest.raises(FileExistsError):
        proxied.create_exclusive("step-1/manifest.json", b"{ }")
    reqs = [r for r in s3_faults.requests if r.path.endswith("/manifest.json")]
    assert [(r.method, r.status) for r in reqs] == [("PUT", 200), ("PUT", 412)]
    assert all(r.header("If-None-Match") == "*" for r in reqs)
    assert not any(r.header("x-amz-copy-source") for r in s3_faults.requests)  # no copy-as-rename
    assert proxied.read_bytes("step-1/manifest.json") == b"{}"
    # Before the first commit, once: the probe (two conditional PUTs, the second refused) and its deletion.
    probe = [(r.method, r.status) for r in s3_faults.requests if PROBE_PREFIX in r.path]
    assert probe == [("PUT", 200), ("PUT", 412), ("DELETE", 204)]
    last_probe = max(i for i, r in enumerate(s3_faults.requests) if PROBE_PREFIX in r.path)
    assert s3_faults.requests.index(reqs[0]) > last_probe


def test_listing_sees_other_writers(st: S3Storage, s3_server: S3Server) -> None:
    s3_client = s3_server.client
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
    moto_proxied: S3Storage, s3_faults: S3Faults, s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxied = moto_proxied
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


def test_abort_incomplete_uploads(moto_st: S3Storage, s3_client: Any) -> None:
    st = moto_st
    s3_client.create_multipart_upload(Bucket=BUCKET, Key="run/step-1/x.bin")
    s3_client.create_multipart_upload(Bucket=BUCKET, Key="run/step-10/y.bin")
    s3_client.create_multipart_upload(Bucket=BUCKET, Key="other/z.bin")
    # moto reports every upload as initiated in 2010, so only a huge age keeps them.
    assert st.abort_incomplete_uploads("step-1", older_than_seconds=1e10) == 0
    assert st.abort_incomplete_uploads("step-1") == 1
    assert sorted(u["Key"] for u in _uploads(s3_client)) == ["other/z.bin", "run/step-10/y.bin"]
    assert st.abort_incomplete_uploads("") == 1
    assert [u["Key"] for u in _uploads(s3_client)] == ["other/z.bin"]


def test_non_transient_errors_pass_through(proxied: S3Storage, faults: S3Faults) -> None:
    proxied.write_bytes("x", b"1")
    faults.fail_next(1, status=403)
    with pytest.raises(PermissionError):
        proxied.read_bytes("x")
    assert faults.failed == 1  # not retried
    with pytest.raises(FileNotFoundError):
        proxied.read_bytes("missing")


def test_missing_bucket_is_a_typed_error_not_an_empty_root(s3_server: S3Server) -> None:
    # A wrong bucket is a configuration error: it must not look like an empty checkpoint root or a missing object
    # (a caller's "except FileNotFoundError: start from scratch" must not swallow it).
    st = _storage(("s3://no-such-bucket/x", s3_server.storage_options))
    ops = {
        "read_bytes": lambda: st.read_bytes("a"),
        "read_into": lambda: st.read_into("a", 0, [memoryview(bytearray(10))]),
        "list_dir": lambda: st.list_dir(""),
        "exists": lambda: st.exists("step-000000000001/manifest.json"),
        "write_bytes": lambda: st.write_bytes("a", b"x"),
        "multipart": lambda: st.write_bytes("big", bytes(PART + 1)),
        "create_exclusive": lambda: st.create_exclusive("m", b"x"),
    }
    for name, op in ops.items():
        with pytest.raises(StorageError) as ei:
            op()
        e = ei.value
        assert not isinstance(e, FileNotFoundError), name
        assert e.errno == errno.ENOENT, (name, e.errno)
        assert "'no-such-bucket' does not exist" in str(e) and "bucket name" in str(e), (name, str(e))
        assert s3_server.endpoint in str(e), str(e)
    st.close()
    # A missing *prefix* in an existing bucket is an empty root, not an error.
    ok = _storage(("s3://test-bucket/no/such/prefix", s3_server.storage_options))
    assert ok.list_dir("") == [] and ok.list_dir("step-1") == []
    assert not ok.exists("step-1") and not ok.exists("step-1/manifest.json")
    with pytest.raises(FileNotFoundError) as missing:
        ok.read_bytes("step-1/manifest.json")
    assert not isinstance(missing.value, StorageError)  # a missing object stays a plain FileNotFoundError
    ok.close()


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"])
def test_rejected_credentials_are_typed_with_eacces(s3_server: S3Server, code: str) -> None:
    """s3rver checks the access key for real (``InvalidAccessKeyId``); moto accepts any key, so there the proxy
    answers every request with the 403 a real server sends."""
    if s3_server.name == "s3rver" and code == "InvalidAccessKeyId":
        opts = {**s3_server.storage_options, "key": "AKIAWRONG", "secret": "wrong"}
        root = (s3_server.url, opts)
    else:
        faults = s3_server.faults()
        faults.fail_always(403, code=code)
        root = faults.root
    st = _storage(root)
    for name, op in {
        "list_dir": lambda: st.list_dir(""),
        "exists": lambda: st.exists("step-1/manifest.json"),  # HEAD: a 403 without a body
        "read_bytes": lambda: st.read_bytes("a"),
        "write_bytes": lambda: st.write_bytes("a", b"x"),
        "create_exclusive": lambda: st.create_exclusive("m", b"x"),
    }.items():
        with pytest.raises(StorageError) as ei:
            op()
        e = ei.value
        assert isinstance(e, PermissionError) and e.errno == errno.EACCES, (name, type(e).__mro__, e.errno)
        assert "check the credentials" in str(e), (name, str(e))
    st.close()


# -- conditional writes: never assume the server enforces If-None-Match ----------------------------------------
def test_commit_is_refused_where_the_server_ignores_if_none_match(s3_server: S3Server) -> None:
    """On s3rver both conditional PUTs of one key "succeed" and the second replaces the first: every commit
    must be refused with a typed error that names the limitation. moto enforces the condition: the probe passes."""
    faults = s3_server.faults()
    st = _storage(faults.root)
    if s3_server.enforces_conditional_put:
        st.create_exclusive("step-1/manifest.json", b"first")
        with pytest.raises(FileExistsError):
            st.create_exclusive("step-1/manifest.json", b"second")
        assert st.check_conditional_writes() is True
    else:
        for _ in range(2):  # the probe result is cached; the refusal is not a one-off
            with pytest.raises(UnsupportedStorageError) as ei:
                st.create_exclusive("step-1/manifest.json", b"first")
            msg = str(ei.value)
            assert isinstance(ei.value, StorageError) and ei.value.errno == errno.EOPNOTSUPP
            assert "ignores 'If-None-Match: *'" in msg and "io.s3_single_writer" in msg and faults.endpoint in msg
        assert not st.exists("step-1/manifest.json")
    probes = [r for r in faults.requests if PROBE_PREFIX in r.path]
    assert [r.method for r in probes] == ["PUT", "PUT", "DELETE"]  # probed once per storage, then cached
    assert all(r.header("If-None-Match") == "*" for r in probes[:2])
    assert not [k for k in s3_server.keys() if PROBE_PREFIX in k]  # the probe object is gone
    st.close()


def test_single_writer_mode_on_a_server_without_conditional_writes(
    s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    st = _storage(s3_server.root, s3_single_writer=True)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        st.create_exclusive("step-1/manifest.json", b"first")
        # Even without the server's help, an existing manifest is never replaced by this writer.
        with pytest.raises(FileExistsError):
            st.create_exclusive("step-1/manifest.json", b"second")
        st.create_exclusive("step-2/manifest.json", b"other")
    assert st.read_bytes("step-1/manifest.json") == b"first"
    assert st.read_bytes("step-2/manifest.json") == b"other"
    warned = [r.message for r in caplog.records if "s3_single_writer" in r.message]
    if s3_server.enforces_conditional_put:
        assert warned == []  # the option changes nothing where the server enforces the condition
    else:
        assert len(warned) == 1 and "NOT atomic" in warned[0] and "ignores 'If-None-Match: *'" in warned[0]
    st.close()


def test_gc_degrades_where_list_multipart_uploads_is_not_implemented(
    s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    st = _storage(s3_server.root)
    w = st.open_write("step-1/x.bin")
    w.write([memoryview(_data(PART + 1))])  # one part uploaded, never completed
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        first = st.abort_incomplete_uploads("")
        second = st.abort_incomplete_uploads("")
    warned = [r.message for r in caplog.records if "ListMultipartUploads" in r.message]
    if s3_server.lists_uploads:
        assert (first, second) == (1, 0) and warned == []
    else:
        assert (first, second) == (0, 0)  # nothing it can list, nothing it can abort: not an error
        assert len(warned) == 1 and "does not implement ListMultipartUploads" in warned[0]
    w.abort()
    st.close()


def test_gc_removes_probe_objects_of_killed_processes(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.client.put_object(Bucket=BUCKET, Key=f"run/{PROBE_PREFIX}deadbeef", Body=b"")
    s3_server.client.put_object(Bucket=BUCKET, Key="run/step-1/keep", Body=b"")
    st = _storage(s3_server.root)
    st.abort_incomplete_uploads("")
    assert f"run/{PROBE_PREFIX}deadbeef" in s3_server.keys()  # young: maybe another process's probe in use
    monkeypatch.setattr("ckptstore.storage.s3.PROBE_MIN_AGE_SECONDS", 0.0)
    st.abort_incomplete_uploads("")
    assert s3_server.keys() == ["run/step-1/keep"]
    st.close()


# -- borrow mode: the caller keeps its buffers until close(); nothing is copied ------------------------------
def _borrowed_write(st: S3Storage, rel: str, pieces: list[np.ndarray]) -> None:
    w = st.open_write(rel, borrow=True)
    for p in pieces:
        w.write([memoryview(p)])
    w.close()


def test_borrow_small_object_is_one_put_from_several_buffers(faults: S3Faults) -> None:
    s3_faults = faults
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


def test_borrow_large_object_is_multipart_without_staging(s3_server: S3Server, faults: S3Faults) -> None:
    s3_root, s3_client = faults.root, s3_server.client
    # Parts straddle the caller's buffers (a 1000-byte head first), yet no part buffer is staged.
    data = _data(3 * PART + 777, seed=4)
    st2 = _storage(s3_root, single_put_bytes=PART)
    staged: list[int] = []
    orig_get = st2._buffers.get
    st2._buffers.get = lambda: staged.append(1) or orig_get()  # type: ignore[method-assign]
    _borrowed_write(st2, "big.bin", [data[:1000], data[1000 : 2 * PART], data[2 * PART :]])
    head = s3_client.head_object(Bucket=BUCKET, Key="run/big.bin")
    assert head["ContentLength"] == data.nbytes
    parts = [r for r in faults.requests if r.method == "PUT" and "partNumber=" in r.query]
    assert len(parts) == 4  # 3 full parts + the rest
    if s3_server.name == "moto":
        assert head["ETag"].strip('"').endswith("-4")
    assert staged == []
    out = np.zeros_like(data)
    st2.read_into("big.bin", 0, [memoryview(out)])
    assert np.array_equal(out, data)
    assert s3_server.uploads() == []
    st2.close()


def test_borrow_retry_resends_the_whole_body(faults: S3Faults) -> None:
    s3_faults = faults
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


def test_borrow_failure_aborts_and_leaves_no_object(faults: S3Faults, s3_server: S3Server) -> None:
    s3_faults = faults
    st = _storage(s3_faults.root, single_put_bytes=PART)
    s3_faults.fail_always(500, match=lambda r: "partNumber" in r.query)
    w = st.open_write("broken.bin", borrow=True)
    with pytest.raises(OSError):
        w.write([memoryview(_data(3 * PART, seed=11))])
        w.close()
    s3_faults.clear()
    assert not st.exists("broken.bin")
    # s3rver cannot abort (405): its upload stays; moto's is aborted.
    assert s3_server.uploads() == ([] if s3_server.name == "moto" else ["run/broken.bin"])
    st.close()
