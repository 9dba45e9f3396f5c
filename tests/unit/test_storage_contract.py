"""The storage contract, run unchanged on every backend: ``file://``, ``memory://`` and ``s3://`` (moto server).

What the layers above rely on: multi-buffer writes, exact reads at offsets (never a silent short read), listings
(names, or typed entries with kind/size/mtime), deletes, and ``create_exclusive`` as the one atomic, create-only
commit; paths never leave the root; capabilities declared on the class.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from ckptstore.options import IOOptions, MiB
from ckptstore.storage import Storage, open_storage
from ckptstore.storage.base import Entry
from ckptstore.storage.local import LocalStorage
from ckptstore.storage.s3 import S3Storage

BACKENDS = [
    pytest.param("file", id="file"),
    pytest.param("memory", id="memory"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Storage]:
    kind = request.param
    if kind == "file":
        st = open_storage(f"file://{tmp_path}/root")
    elif kind == "memory":
        st = open_storage(f"memory://contract-{uuid.uuid4().hex}")
    else:
        url, opts = request.getfixturevalue("s3_root")
        assert isinstance(open_storage(url, opts), S3Storage)
        # Small parts and read ranges so multipart uploads and split GETs run on test-sized data.
        st = S3Storage(url, opts, io=IOOptions(part_bytes=5 * MiB, read_chunk_bytes=1 * MiB))
    try:
        yield st
    finally:
        if kind == "memory":
            st.remove_tree("")
        st.close()


def _payload() -> tuple[list[memoryview], bytes]:
    rng = np.random.default_rng(1234)
    header = rng.integers(0, 256, 100, dtype=np.uint8)
    big = torch.from_numpy(rng.integers(0, 256, 6 * MiB + 17, dtype=np.uint8))
    floats = rng.standard_normal(300_000).astype(np.float32)  # not a byte format: the writer must cast
    tail = rng.integers(0, 256, 5 * MiB + 3, dtype=np.uint8)
    bufs = [memoryview(header), memoryview(big.numpy()), memoryview(b""), memoryview(floats), memoryview(tail)]
    expected = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
    return bufs, expected


def test_write_buffers_then_read(storage: Storage) -> None:
    bufs, expected = _payload()
    w = storage.open_write("step-1/shard-0.bin")
    w.write(bufs[:2])
    w.write(bufs[2:])
    w.close()

    assert storage.size("step-1/shard-0.bin") == len(expected)
    assert storage.read_bytes("step-1/shard-0.bin") == expected
    assert storage.read_bytes("step-1/shard-0.bin", 0, 8) == expected[:8]
    assert storage.read_bytes("step-1/shard-0.bin", 99, 5000) == expected[99:5000]
    assert storage.read_bytes("step-1/shard-0.bin", 7, 7) == b""
    assert storage.read_bytes("step-1/shard-0.bin", len(expected) - 5) == expected[-5:]

    # Destination split over several buffers of different types; spans several read ranges on S3.
    offset = 12_345
    a = np.zeros(1000, dtype=np.uint8)
    b = torch.zeros(3 * MiB, dtype=torch.uint8)
    c = np.zeros(1000, dtype=np.float32)
    storage.read_into("step-1/shard-0.bin", offset, [memoryview(a), memoryview(b.numpy()), memoryview(c)])
    got = bytes(a) + bytes(b.numpy()) + c.tobytes()
    assert got == expected[offset : offset + len(got)]

    small = bytearray(10)
    storage.read_into("step-1/shard-0.bin", len(expected) - 10, [memoryview(small)])
    assert bytes(small) == expected[-10:]
    storage.read_into("step-1/shard-0.bin", 5, [])  # nothing to read is fine


def test_reads_beyond_eof_raise(storage: Storage) -> None:
    storage.write_bytes("f.bin", bytes(range(100)))
    with pytest.raises(EOFError):
        storage.read_into("f.bin", 90, [memoryview(bytearray(20))])
    with pytest.raises(EOFError):
        storage.read_into("f.bin", 200, [memoryview(bytearray(5))])
    with pytest.raises(EOFError):
        storage.read_bytes("f.bin", 50, 150)
    assert storage.read_bytes("f.bin", 95) == bytes(range(95, 100))
    assert storage.read_bytes("f.bin", 100) == b""  # an open-ended read at EOF is empty, like a file
    with pytest.raises(EOFError):
        # Only the last of several buffers is short.
        storage.read_into("f.bin", 0, [memoryview(bytearray(60)), memoryview(bytearray(60))])


def test_missing_file(storage: Storage) -> None:
    assert not storage.exists("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.size("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_into("nope.bin", 0, [memoryview(bytearray(4))])


def test_list_dir_exists_size(storage: Storage) -> None:
    storage.write_bytes("a/b/c.bin", b"c" * 3)
    storage.write_bytes("a/d.bin", b"d" * 4)
    storage.write_bytes("e.bin", b"")
    storage.write_bytes("ab.bin", b"x")

    assert storage.list_dir("") == ["a", "ab.bin", "e.bin"]
    assert storage.list_dir("a") == ["b", "d.bin"]
    assert storage.list_dir("a/b") == ["c.bin"]
    assert storage.list_dir("missing") == []
    assert storage.exists("a") and storage.exists("a/b") and storage.exists("a/b/c.bin")
    assert storage.exists("e.bin")
    assert not storage.exists("a/x.bin") and not storage.exists("a/b/c")
    assert storage.size("a/b/c.bin") == 3
    assert storage.size("e.bin") == 0
    assert storage.read_bytes("e.bin") == b""


def test_list_dir_sees_new_objects(storage: Storage) -> None:
    # A listing taken before a write must not hide the new file (s3fs caches listings unless told not to).
    storage.write_bytes("d/one", b"1")
    assert storage.list_dir("d") == ["one"]
    assert not storage.exists("d/two")
    storage.write_bytes("d/two", b"2")
    assert storage.list_dir("d") == ["one", "two"]
    assert storage.exists("d/two")
    assert storage.size("d/two") == 1


def test_remove_and_remove_tree(storage: Storage) -> None:
    for rel in ("s/x.bin", "s/sub/y.bin", "s/sub/deeper/z.bin", "sibling.bin", "s2/keep.bin"):
        storage.write_bytes(rel, b"data")
    storage.remove("s/x.bin")
    assert not storage.exists("s/x.bin")
    storage.remove("s/x.bin")  # removing what is gone is not an error

    storage.remove_tree("s")
    assert not storage.exists("s")
    assert not storage.exists("s/sub/deeper/z.bin")
    assert storage.list_dir("s") == []
    # Prefix neighbours survive ("s" must not match "s2/" or "sibling.bin").
    assert storage.exists("s2/keep.bin") and storage.exists("sibling.bin")
    assert storage.list_dir("") == ["s2", "sibling.bin"]
    storage.remove_tree("never-existed")


def test_create_exclusive(storage: Storage) -> None:
    storage.create_exclusive("step-1/manifest.json", b'{"first": true}')
    with pytest.raises(FileExistsError):
        storage.create_exclusive("step-1/manifest.json", b'{"second": true}')
    assert storage.read_bytes("step-1/manifest.json") == b'{"first": true}'
    assert storage.list_dir("step-1") == ["manifest.json"]


def test_write_hint_replaces_whole_and_leaves_no_temp(storage: Storage) -> None:
    storage.write_hint("step-1/.saving-abc", b'{"heartbeat": 1}')
    storage.write_hint("step-1/.saving-abc", b'{"heartbeat": 2.5}')
    assert storage.read_bytes("step-1/.saving-abc") == b'{"heartbeat": 2.5}'
    assert storage.list_dir("step-1") == [".saving-abc"]


def test_local_write_hint_never_flushes_the_disk(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save's lease is a hint for gc: writing or refreshing it must cost no fsync on the save's path (each one is
    milliseconds on a real disk, paid on every small save)."""
    st = open_storage(f"file://{tmp_path}/root")
    st.makedirs("step-1")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    st.write_hint("step-1/.saving-abc", b"{}")
    st.write_hint("step-1/.saving-abc", b'{"n": 2}')
    assert synced == []
    assert st.read_bytes("step-1/.saving-abc") == b'{"n": 2}'


def test_create_exclusive_race_one_winner(storage: Storage) -> None:
    for round_ in range(5):
        rel = f"race-{round_}/manifest.json"
        barrier = threading.Barrier(2)
        outcome: dict[int, str] = {}

        def commit(
            i: int, rel: str = rel, barrier: threading.Barrier = barrier, outcome: dict[int, str] = outcome
        ) -> None:
            barrier.wait()
            try:
                storage.create_exclusive(rel, f"writer-{i}".encode() * 100)
                outcome[i] = "won"
            except FileExistsError:
                outcome[i] = "lost"

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(outcome.values()) == ["lost", "won"], outcome
        winner = next(i for i, o in outcome.items() if o == "won")
        assert storage.read_bytes(rel) == f"writer-{winner}".encode() * 100


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/abs", "/", "s3://other/x", "..", "a\\..\\x"])
def test_path_escape_refused(storage: Storage, bad: str) -> None:
    with pytest.raises(PermissionError):
        storage.write_bytes(bad, b"x")
    with pytest.raises(PermissionError):
        storage.read_bytes(bad)
    with pytest.raises(PermissionError):
        storage.create_exclusive(bad, b"x")
    with pytest.raises(PermissionError):
        storage.open_write(bad)
    with pytest.raises(PermissionError):
        storage.list_dir(bad)
    with pytest.raises(PermissionError):
        storage.remove_tree(bad)


def test_abort_leaves_nothing(storage: Storage) -> None:
    bufs, _ = _payload()
    w = storage.open_write("aborted.bin")
    w.write(bufs)
    w.abort()
    assert not storage.exists("aborted.bin")
    assert storage.list_dir("") == []


def test_list_entries_and_stat(storage: Storage) -> None:
    # One listing call gives every entry's kind, size and mtime; stat gives one entry. Same on every backend.
    before = time.time() - 120
    storage.write_bytes("st/a.bin", b"a" * 7)
    storage.write_bytes("st/sub/b.bin", b"bb")
    storage.write_bytes("st/empty.bin", b"")
    entries = storage.list_entries("st")
    assert [e.name for e in entries] == ["a.bin", "empty.bin", "sub"]
    by = {e.name: e for e in entries}
    assert (by["a.bin"].kind, by["a.bin"].size) == ("file", 7)
    assert (by["empty.bin"].kind, by["empty.bin"].size) == ("file", 0)
    assert (by["sub"].kind, by["sub"].size) == ("dir", 0)
    assert storage.has_mtime
    for name in ("a.bin", "empty.bin"):
        m = by[name].mtime
        assert m is not None and before < m < time.time() + 120, (name, m)
    assert all(isinstance(e, Entry) for e in entries)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entries[0].size = 1  # type: ignore[misc]
    assert storage.list_entries("st") == entries  # sorted, stable
    assert [e.name for e in storage.list_entries("")] == ["st"]
    assert storage.list_entries("st/sub") == [Entry("b.bin", "file", 2, storage.list_entries("st/sub")[0].mtime)]
    assert storage.list_entries("missing") == []
    assert storage.list_entries("st/a.bin") == []  # a file has no entries

    e = storage.stat("st/a.bin")
    assert e is not None and (e.name, e.kind, e.size) == ("a.bin", "file", 7) and e.mtime is not None
    d = storage.stat("st/sub")
    assert d is not None and (d.name, d.kind) == ("sub", "dir")
    assert storage.stat("st/nope.bin") is None
    assert storage.stat("nope/deeper/x") is None
    # A new object is seen at once (no cached listing).
    storage.write_bytes("st/late.bin", b"123")
    assert "late.bin" in [x.name for x in storage.list_entries("st")]
    late = storage.stat("st/late.bin")
    assert late is not None and late.size == 3
    with pytest.raises(PermissionError):
        storage.list_entries("../x")
    with pytest.raises(PermissionError):
        storage.stat("/abs")


def test_capabilities_are_declared(storage: Storage) -> None:
    # Declared on the class (documented there), not probed with getattr by the layers above.
    for name in ("small_reads_cheap", "exclusive_create", "create_all_or_nothing", "has_links", "has_mtime"):
        assert isinstance(getattr(type(storage), name, None), (bool, property)), name
        assert isinstance(getattr(storage, name), bool), name
    assert storage.exclusive_create
    assert storage.create_all_or_nothing  # link(2) works here; S3: one conditional PUT; memory: one pipe
    local = isinstance(storage, LocalStorage)
    assert storage.small_reads_cheap is local
    assert storage.has_links is local
    assert Storage.small_reads_cheap is False and Storage.has_mtime is True
