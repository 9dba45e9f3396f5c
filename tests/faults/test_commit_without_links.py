"""The commit on filesystems without hard links (issue 14, item 6).

``LocalStorage.create_exclusive`` commits with link(2) of a complete temp file. Where link(2) fails with
EPERM/ENOSYS/ENOTSUP/EOPNOTSUPP/EXDEV (vfat/exfat, some FUSE and SMB mounts) it used to fall back to "exists?
then rename" — two writers could both report "committed" and one's manifest was silently replaced — and ENOSYS
failed every save. Now it falls back to renameat2(RENAME_NOREPLACE) of the temp file (still all or nothing),
and where that is missing too (NFS, old kernels: EINVAL) to O_CREAT|O_EXCL of the final name, then write +
fsync: exclusive, but visible while incomplete (``create_all_or_nothing`` False). Which one works is learnt once
per storage instance.

Rows: two threads (each with its own ``LocalStorage``) held together right at link(2), then racing; two real
processes racing 8 rounds; a failed in-place write frees the name; a crash mid-write leaves a torn manifest that
the manifest reader refuses; NFS's retransmitted LINK (EEXIST although our link succeeded); whole saves and
restores through the manager with links disabled.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import ManifestError
from ckptstore.format.manifest import MANIFEST_NAME, Manifest, step_dir
from ckptstore.storage import local as local_mod
from ckptstore.storage.local import LocalStorage
from tests.faults.conftest import assert_state, make_state

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_excl_child.py")

# (errno link(2) gives, whether renameat2 RENAME_NOREPLACE works too)
MODES = [
    pytest.param(errno.EPERM, True, id="EPERM-rename_noreplace"),
    pytest.param(errno.EPERM, False, id="EPERM-O_EXCL"),
    pytest.param(errno.ENOSYS, True, id="ENOSYS-rename_noreplace"),
    pytest.param(errno.ENOSYS, False, id="ENOSYS-O_EXCL"),
]


def disable_links(monkeypatch: pytest.MonkeyPatch, code: int, rename2: bool, hold: threading.Barrier | None) -> None:
    def no_link(*a: Any, **k: Any) -> None:
        if hold is not None:
            hold.wait(timeout=30)  # both writers are inside the commit before either goes on
        raise OSError(code, os.strerror(code))

    def no_rename2(*a: Any, **k: Any) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "link", no_link)
    if not rename2:
        monkeypatch.setattr(local_mod, "_renameat2", no_rename2)
    elif local_mod._renameat2 is None:
        pytest.skip("this platform has no renameat2 (the O_EXCL variants cover it)")


@pytest.mark.parametrize(("code", "rename2"), MODES)
def test_two_writers_without_hard_links_one_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, rename2: bool
) -> None:
    hold = threading.Barrier(2)
    disable_links(monkeypatch, code, rename2, hold)
    for r in range(6):
        rel = f"race-{r}/manifest.json"
        hold.reset()
        outcome: dict[int, str] = {}
        # Each writer is its own storage instance (as two processes would be), racing the same name.
        stores = [LocalStorage(str(tmp_path / "root")) for _ in range(2)]
        data = {i: f"writer-{i};".encode() * 20_000 for i in range(2)}

        def commit(
            i: int, rel: str = rel, outcome: dict[int, str] = outcome, stores: list[Any] = stores, data: Any = data
        ) -> None:
            try:
                stores[i].create_exclusive(rel, data[i])
                outcome[i] = "won"
            except FileExistsError:
                outcome[i] = "lost"
            except BaseException as e:
                outcome[i] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(outcome.values()) == ["lost", "won"], (r, outcome)
        (winner,) = [i for i, o in outcome.items() if o == "won"]
        assert stores[0].read_bytes(rel) == data[winner]
        assert stores[0].list_dir(f"race-{r}") == ["manifest.json"]  # no temp file left behind
        for s in stores:
            assert s.exclusive_create and not s.has_links
            assert s.create_all_or_nothing is rename2


@pytest.mark.parametrize(("code", "rename2"), [MODES[0], MODES[1]])
def test_two_processes_without_hard_links_one_wins(tmp_path: Path, code: int, rename2: bool) -> None:
    if rename2 and local_mod._renameat2 is None:
        pytest.skip("this platform has no renameat2 (the O_EXCL variant covers it)")
    rounds = 8
    root, bdir = tmp_path / "root", tmp_path / "barriers"
    bdir.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD), str(root), str(w), str(rounds), str(bdir), str(code), "0" if rename2 else "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for w in (0, 1)
    ]
    outs = [p.communicate(timeout=150) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results: dict[int, dict[int, str]] = collections.defaultdict(dict)
    for out, _ in outs:
        lines = [json.loads(ln) for ln in out.splitlines()]
        assert lines[-1]["links"] is False and lines[-1]["all_or_nothing"] is rename2, lines[-1]
        for row in lines[:-1]:
            results[row["round"]][row["writer"]] = row["result"]
    st = LocalStorage(str(root))
    winners = []
    for r in range(rounds):
        assert sorted(results[r].values()) == ["lost", "won"], (r, results[r])
        (winner,) = [w for w, res in results[r].items() if res == "won"]
        winners.append(winner)
        assert st.read_bytes(f"race-{r}/manifest.json") == (f"writer {winner} round {r};" * 4000).encode()
        assert st.list_dir(f"race-{r}") == ["manifest.json"]
    print(f"\n[create_exclusive race, link errno {code}, rename_noreplace={rename2}] winners: {winners}")


def test_failed_in_place_write_frees_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disable_links(monkeypatch, errno.ENOSYS, False, None)
    st = LocalStorage(str(tmp_path / "root"))
    st.create_exclusive("first/manifest.json", b"learns that only the in-place commit works here")
    assert not st.create_all_or_nothing
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data)[:4096])  # short writes: several calls per file

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as exc:
        st.create_exclusive("s/manifest.json", b"m" * 20_000)
    assert exc.value.errno == errno.ENOSPC
    assert st.list_dir("s") == []  # neither the torn final file nor a temp file stays
    monkeypatch.setattr(os, "write", real_write)
    st.create_exclusive("s/manifest.json", b"m" * 20_000)  # the name is free again
    assert st.read_bytes("s/manifest.json") == b"m" * 20_000


CRASH_CHILD = r"""
import errno, os, signal, sys
from ckptstore import CheckpointManager
from ckptstore.storage import local as local_mod
import torch
root = sys.argv[1]
mgr = CheckpointManager(root)
mgr.save(1, {"w": torch.arange(10.0)})
def no_link(*a, **k):
    raise OSError(errno.EPERM, "no hard links")
def no_rename2(*a, **k):
    raise OSError(errno.EINVAL, "not supported")
os.link = no_link
local_mod._renameat2 = no_rename2
real_write = os.write
def write(fd, data):
    if not os.readlink(f"/proc/self/fd/{fd}").endswith("/manifest.json"):
        return real_write(fd, data)
    real_write(fd, bytes(data)[: len(data) // 2])  # half of the manifest reaches the file...
    os.kill(os.getpid(), signal.SIGKILL)           # ...then the power goes
os.write = write
mgr.save(2, {"w": torch.arange(10.0) + 1})
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the child finds the manifest fd in /proc")
def test_crash_mid_in_place_commit_leaves_a_torn_manifest_that_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    p = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == -9, p.stderr[-3000:]
    torn = (root / step_dir(2) / MANIFEST_NAME).read_bytes()
    assert torn, "the commit did not start"
    # The torn file holds the name (the O_EXCL commit's known cost) ...
    st = LocalStorage(str(root))
    with pytest.raises(FileExistsError):
        st.create_exclusive(f"{step_dir(2)}/{MANIFEST_NAME}", b"another writer")
    # ... but no reader trusts it: its self-checksum (the last field) is missing.
    with pytest.raises(ManifestError):
        Manifest.from_bytes(torn, where="torn")
    mgr = CheckpointManager(str(root))
    target = {"w": torch.zeros(10)}
    assert mgr.restore(target, step="latest").step == 1  # falls back to the last complete step
    assert_state(target, {"w": torch.arange(10.0)})


def test_nfs_retransmitted_link_is_our_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Over NFS a LINK whose reply was lost is retransmitted; the server then answers EEXIST although the first
    # attempt made the link. The commit checks whether the name is its own temp file (same inode, nlink 2).
    real_link = os.link

    def link_then_eexist(*a: Any, **k: Any) -> None:
        real_link(*a, **k)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))

    st = LocalStorage(str(tmp_path / "root"))
    monkeypatch.setattr(os, "link", link_then_eexist)
    st.create_exclusive("s/manifest.json", b"ours")
    assert st.read_bytes("s/manifest.json") == b"ours" and st.list_dir("s") == ["manifest.json"]
    monkeypatch.setattr(os, "link", real_link)
    with pytest.raises(FileExistsError):  # a real conflict is still one
        st.create_exclusive("s/manifest.json", b"theirs")
    assert st.read_bytes("s/manifest.json") == b"ours" and st.has_links


@pytest.mark.parametrize(("code", "rename2"), [MODES[2], MODES[3]])
def test_saves_and_restores_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, rename2: bool
) -> None:
    disable_links(monkeypatch, code, rename2, None)
    mgr = CheckpointManager(str(tmp_path / "root"), retention={"keep_last": 2})
    for s in (1, 2, 3):
        mgr.save(s, make_state(s))
    assert mgr.steps() == [2, 3]
    with pytest.raises(FileExistsError):
        mgr.save(3, make_state(9))  # a committed step stays immutable
    target = make_state(0)
    assert mgr.restore(target, step="latest").step == 3
    assert_state(target, make_state(3))
    assert_state(CheckpointManager(str(tmp_path / "root")).load(2), make_state(2))
    assert sorted(os.listdir(tmp_path / "root" / step_dir(3))) == sorted([*mgr.manifest(3).files, MANIFEST_NAME])
