"""LocalStorage on a hostile root (issue 14, items 5, 10 and 15).

- Symbolic links below the root are never followed: not by deletes (``remove``/``remove_tree``/``remove_dir``),
  not by writes, not by reads or listings; nothing outside the root is read, written or deleted through one.
- Only regular files are read: a FIFO, a directory, a symbolic link (to ``/dev/zero`` or anything) named like a
  file give ``NotRegularFileError`` (an ``OSError``) at once, never a hang (every call here runs in a thread
  with a time bound; the /dev/zero case under RLIMIT_AS lives in tests/faults/test_special_files.py).
- Directories are created durably: the parent of every directory made is fsynced (seen through a spy on
  ``os.fsync`` and, where strace is installed, in the real system calls).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore.storage import open_storage
from ckptstore.storage.base import NotRegularFileError
from ckptstore.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(120)

STEP = "step-000000000005"


def bounded(fn: Callable[[], Any], seconds: float = 10.0, unblock: Callable[[], None] | None = None) -> Any:
    """Run ``fn`` in a thread; its result, or re-raise its exception. Fails (and unblocks it) if it hangs."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock is not None:
            unblock()
            t.join(10)
        pytest.fail(f"{fn} did not return within {seconds} s (it blocked)")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def read_calls(st: LocalStorage, rel: str) -> list[Callable[[], Any]]:
    """Every read path of the storage, on ``rel``."""
    return [
        lambda: st.read_bytes(rel),
        lambda: st.read_bytes(rel, 0, 4),
        lambda: st.read_into(rel, 0, [memoryview(bytearray(4))]),
        lambda: st.map_private(rel),
        lambda: st.size(rel),
    ]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the root that looks like a step: what a hostile link points at."""
    d = tmp_path / "outside"
    (d / "sub").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "manifest.json").write_bytes(b"precious manifest")
    (d / "victim.bin").write_bytes(b"precious data")
    (d / "sub" / "deep.bin").write_bytes(b"deep")
    return d


def snapshot(d: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))
    }  # fmt: skip


@pytest.fixture
def st(tmp_path: Path) -> LocalStorage:
    s = open_storage(str(tmp_path / "root"))
    assert isinstance(s, LocalStorage)
    s.makedirs("")
    return s


def _refused(exc: pytest.ExceptionInfo[NotRegularFileError], code: int, what: str) -> None:
    e = exc.value
    assert isinstance(e, OSError) and e.errno == code, (e.errno, str(e))
    assert what in str(e) and e.filename and what in e.filename, str(e)


# -- deletes never follow a link (item 5) ---------------------------------------------------------------------
def test_deletes_never_follow_a_symlinked_component(st: LocalStorage, outside: Path) -> None:
    root = Path(st.root)
    (root / STEP).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)

    with pytest.raises(NotRegularFileError) as exc:
        st.remove(f"{STEP}/manifest.json")
    _refused(exc, errno.ELOOP, STEP)
    assert "symbolic link" in str(exc.value) and "Remove it" in str(exc.value)
    with pytest.raises(NotRegularFileError):
        st.remove(f"{STEP}/sub/deep.bin")
    with pytest.raises(NotRegularFileError):
        st.remove_tree(f"{STEP}/sub")
    with pytest.raises(NotRegularFileError) as exc:
        st.remove_tree(STEP)  # the link itself: refused, not followed (remove() unlinks a link on purpose)
    _refused(exc, errno.ELOOP, STEP)
    with pytest.raises(NotRegularFileError):
        st.remove_dir(f"{STEP}/empty")
    with pytest.raises(NotRegularFileError):
        st.remove_dir(STEP)
    assert snapshot(outside) == before
    assert (root / STEP).is_symlink()

    st.remove(STEP)  # unlinking the link itself is fine: it is inside the root, its target is untouched
    assert not os.path.lexists(root / STEP)
    assert snapshot(outside) == before


def test_remove_tree_unlinks_links_inside_the_tree_never_their_targets(st: LocalStorage, outside: Path) -> None:
    root = Path(st.root)
    step = root / STEP
    (step / "real" / "deeper").mkdir(parents=True)
    (step / "real" / "deeper" / "x.bin").write_bytes(b"x")
    (step / "link-to-dir").symlink_to(outside, target_is_directory=True)
    (step / "real" / "link-to-file").symlink_to(outside / "victim.bin")
    (step / "dangling").symlink_to(root / "nowhere")
    os.mkfifo(step / "fifo")
    before = snapshot(outside)
    st.remove_tree(STEP)
    assert not os.path.lexists(step)
    assert snapshot(outside) == before
    assert st.list_dir("") == []
    st.remove_tree(STEP)  # gone: nothing to do
    # A file where a directory is expected is refused, not removed.
    st.write_bytes("plain.bin", b"p")
    with pytest.raises(NotRegularFileError) as exc:
        st.remove_tree("plain.bin")
    _refused(exc, errno.ENOTDIR, "plain.bin")
    assert st.read_bytes("plain.bin") == b"p"


def test_remove_tree_of_the_root_stays_inside(tmp_path: Path, outside: Path) -> None:
    real = tmp_path / "real-root"
    real.mkdir()
    link_root = tmp_path / "root-link"
    link_root.symlink_to(real, target_is_directory=True)  # the root itself may be a link: it is trusted
    s = LocalStorage(str(link_root))
    s.write_bytes("a/b.bin", b"b")
    (real / "a" / "out").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    assert s.read_bytes("a/b.bin") == b"b" and s.list_dir("") == ["a"]
    s.remove_tree("")
    assert snapshot(outside) == before
    assert list(real.iterdir()) == []


# -- writes never go through a link ---------------------------------------------------------------------------
def test_writes_never_go_through_a_symlink(st: LocalStorage, outside: Path, tmp_path: Path) -> None:
    root = Path(st.root)
    (root / STEP).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    calls: list[Callable[[], Any]] = [
        lambda: st.open_write(f"{STEP}/new.bin"),
        lambda: st.write_bytes(f"{STEP}/victim.bin", b"evil"),
        lambda: st.write_bytes(f"{STEP}/sub/new.bin", b"evil"),
        lambda: st.create_exclusive(f"{STEP}/new-manifest.json", b"evil"),
        lambda: st.makedirs(f"{STEP}/newdir"),
        lambda: st.makedirs(STEP),
    ]
    for call in calls:
        with pytest.raises(NotRegularFileError) as exc:
            call()
        _refused(exc, errno.ELOOP, STEP)
    assert snapshot(outside) == before

    # A final component that is a link (or a hard link to a file outside) is replaced by a new file: the
    # bytes never reach the old inode.
    (root / "good").mkdir()
    (root / "good" / "soft.bin").symlink_to(outside / "victim.bin")
    os.link(outside / "manifest.json", root / "good" / "hard.bin")
    st.write_bytes("good/soft.bin", b"new soft")
    w = st.open_write("good/hard.bin")
    w.write([memoryview(b"new hard")])
    w.close()
    assert snapshot(outside) == before
    assert not (root / "good" / "soft.bin").is_symlink()
    assert st.read_bytes("good/soft.bin") == b"new soft" and st.read_bytes("good/hard.bin") == b"new hard"
    # create_exclusive treats a dangling link as an existing name (it never creates through it).
    (root / "good" / "manifest.json").symlink_to(tmp_path / "would-be-created")
    with pytest.raises(FileExistsError):
        st.create_exclusive("good/manifest.json", b"m")
    assert not (tmp_path / "would-be-created").exists()


def test_abort_removes_only_its_own_file(st: LocalStorage) -> None:
    w = st.open_write("s/f.bin")
    w.write([memoryview(b"mine")])
    # Someone replaces the name meanwhile: abort must not remove their file.
    os.unlink(os.path.join(st.root, "s", "f.bin"))
    Path(st.root, "s", "f.bin").write_bytes(b"theirs")
    w.abort()
    assert st.read_bytes("s/f.bin") == b"theirs"
    w2 = st.open_write("s/g.bin")
    w2.write([memoryview(b"g")])
    w2.abort()
    assert not st.exists("s/g.bin")


# -- reads and listings never follow a link; only regular files are read (item 10) -----------------------------
def test_reads_never_follow_a_symlinked_component(st: LocalStorage, outside: Path) -> None:
    root = Path(st.root)
    (root / STEP).symlink_to(outside, target_is_directory=True)
    (root / "real").mkdir()
    (root / "real" / "manifest.json").symlink_to(outside / "manifest.json")
    for rel in (f"{STEP}/manifest.json", "real/manifest.json"):
        for call in read_calls(st, rel):
            with pytest.raises(NotRegularFileError) as exc:
                bounded(call)
            assert exc.value.errno == errno.ELOOP and exc.value.kind == "symbolic link", str(exc.value)
            assert "symbolic link" in str(exc.value)
    assert not st.exists(f"{STEP}/manifest.json")  # nothing below a link is inside the root
    assert st.exists("real/manifest.json")  # the link itself is an entry of the root
    assert st.list_dir(STEP) == []
    with pytest.raises(NotRegularFileError):
        st.list_entries(STEP)
    with pytest.raises(NotRegularFileError):
        st.stat(f"{STEP}/manifest.json")
    kinds = {e.name: e.kind for e in st.list_entries("")}
    assert kinds == {STEP: "other", "real": "dir"}
    assert [(e.name, e.kind, e.size) for e in st.list_entries("real")] == [("manifest.json", "other", 0)]
    e = st.stat(STEP)
    assert e is not None and e.kind == "other"


def test_fifo_named_like_a_file_never_blocks(st: LocalStorage) -> None:
    root = Path(st.root)
    (root / STEP).mkdir()
    fifo = root / STEP / "manifest.json"
    os.mkfifo(fifo)

    def unblock() -> None:
        # Old code blocked in open(2) waiting for a writer: be that writer so the thread ends.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    rel = f"{STEP}/manifest.json"
    for call in read_calls(st, rel):
        with pytest.raises(NotRegularFileError) as exc:
            bounded(call, 5.0, unblock)
        assert exc.value.kind == "FIFO" and "FIFO" in str(exc.value) and STEP in str(exc.value)
        assert exc.value.errno == errno.EINVAL
    assert st.exists(rel)
    e = st.stat(rel)
    assert e is not None and (e.kind, e.size) == ("other", 0)
    assert [x.kind for x in st.list_entries(STEP)] == ["other"]
    with pytest.raises(FileExistsError):
        bounded(lambda: st.create_exclusive(rel, b"m"), 5.0, unblock)
    bounded(lambda: st.write_bytes(rel, b"replaced"), 5.0, unblock)  # a writer replaces it, never opens it
    assert st.read_bytes(rel) == b"replaced"


def test_directory_named_like_a_file_is_refused(st: LocalStorage) -> None:
    (Path(st.root) / STEP / "manifest.json").mkdir(parents=True)
    rel = f"{STEP}/manifest.json"
    for call in read_calls(st, rel):
        with pytest.raises(NotRegularFileError) as exc:
            bounded(call)
        assert exc.value.errno == errno.EISDIR and exc.value.kind == "directory", str(exc.value)
        assert "is a directory, not a regular file" in str(exc.value)
    with pytest.raises(FileExistsError):
        st.create_exclusive(rel, b"m")
    e = st.stat(rel)
    assert e is not None and e.kind == "dir"


def test_reads_stop_at_the_size_fstat_gave(st: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    st.write_bytes("f.bin", bytes(range(200)))
    asked: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        asked.append(n)
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    assert st.read_bytes("f.bin") == bytes(range(200))
    assert st.read_bytes("f.bin", 150) == bytes(range(150, 200))
    assert sum(asked) == 250, asked  # never more than the file's size
    with pytest.raises(EOFError):
        st.read_bytes("f.bin", 0, 10**12)  # refused from fstat, without allocating a terabyte


# -- durable directories (item 15) ------------------------------------------------------------------------------
def _spy_fsync(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to name fsynced fds")
def test_makedirs_fsyncs_the_parent_of_every_directory_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path.resolve()
    st = LocalStorage(str(base / "a" / "root"))
    synced = _spy_fsync(monkeypatch)
    st.makedirs(f"{STEP}/sub")
    assert synced == [str(base), str(base / "a"), str(base / "a" / "root"), str(base / "a" / "root" / STEP)]
    synced.clear()
    st.makedirs(f"{STEP}/sub")  # nothing made: nothing to fsync
    assert synced == []
    w = st.open_write("step-000000000006/shard.bin")  # a new step directory: durable at the latest at sync_dir,
    w.write([memoryview(b"x")])  # which a commit calls first (deferred there, after the data's own fsync)
    w.close()
    st.sync_dir("step-000000000006")
    root = str(base / "a" / "root")
    assert synced[-2:] == [root + "/step-000000000006", root], synced
    synced.clear()
    st.create_exclusive("step-000000000007/manifest.json", b"m")
    assert synced[0] == root, synced  # the new step dir's entry, before the manifest's fsync
    assert synced[-1] == root + "/step-000000000007"  # and the manifest's entry after the commit


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to name fsynced fds")
def test_a_save_makes_its_new_step_directory_durable_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptstore import CheckpointManager

    root = str(tmp_path.resolve() / "root")
    mgr = CheckpointManager(root)
    mgr.save(2, {"w": torch.ones(4)})  # the first save also makes the root itself
    synced = _spy_fsync(monkeypatch)
    mgr.save(3, {"w": torch.ones(4)})
    manifest_tmp = next(i for i, p in enumerate(synced) if "/.manifest.json.tmp-" in p)
    assert root in synced[:manifest_tmp], synced  # the step directory's entry in the root, before the commit
    assert len(synced) <= 5, synced  # shard, step dir, root, manifest, step dir: nothing more on a small save


STRACE_CHILD = r"""
import sys
from ckptstore.storage.local import LocalStorage
st = LocalStorage(sys.argv[1])
st.makedirs("")
print("READY", flush=True)
st.create_exclusive("step-000000000001/manifest.json", b"{}")
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (the fsync spy test covers it)")
def test_new_step_directory_is_fsynced_in_the_real_syscalls(tmp_path: Path) -> None:
    root = tmp_path.resolve() / "root"
    repo = str(Path(__file__).resolve().parents[2])
    argv = ["strace", "-f", "-qq", "-y", "-e", "trace=mkdir,mkdirat,fsync,write"]
    argv += [sys.executable, "-c", STRACE_CHILD, str(root)]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=repo, env={**os.environ, "PYTHONPATH": repo}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    calls = lines[next(i for i, ln in enumerate(lines) if "READY" in ln) + 1 :]
    r = re.escape(str(root))
    made = [i for i, ln in enumerate(calls) if re.search(rf'mkdirat\(\d+<{r}>, "step-0+1", \d+\) = 0', ln)]
    synced = [i for i, ln in enumerate(calls) if re.search(rf"fsync\(\d+<{r}>\) = 0", ln)]
    assert made, "\n".join(calls)
    assert [i for i in synced if i > made[0]], "the root was never fsynced after the step directory was made:\n" + (
        "\n".join(calls)
    )
