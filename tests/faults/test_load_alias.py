"""What load() tensors share with the shard files: private copies where other hosts write (network/FUSE
filesystems) or with mmap_load=False; copy-on-write maps on local disks (documented)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.format.manifest import step_dir
from ckptstore.storage import local

pytestmark = pytest.mark.faults


def _rewrite_in_place(root: Path, mgr: CheckpointManager, key: str) -> None:
    p = mgr.manifest(1).tensors[key].pieces[0]
    path = root / step_dir(1) / p.file
    with open(path, "r+b") as f:  # a foreign process rewriting the file in place (same size)
        f.seek(p.start)
        f.write(b"\xff" * (p.end - p.start))


@pytest.mark.parametrize("how", ["network-fs", "mmap_load=False"])
def test_loaded_tensors_do_not_change_when_the_file_is_rewritten(tmp_path: Path, monkeypatch, how: str) -> None:
    root = tmp_path / "ck"
    want = torch.arange(4096, dtype=torch.float32)
    CheckpointManager(str(root)).save(1, {"w": want})
    if how == "network-fs":
        monkeypatch.setattr(local, "_fs_type", lambda path: "nfs4")
        mgr = CheckpointManager(str(root))
    else:
        mgr = CheckpointManager(str(root), io={"mmap_load": False})
    got = mgr.load(1)["w"]
    _rewrite_in_place(root, mgr, "w")
    assert torch.equal(got, want)


def test_local_disk_loads_map_the_files_copy_on_write(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    want = torch.arange(4096, dtype=torch.float32)
    mgr = CheckpointManager(str(root))
    mgr.save(1, {"w": want})
    got = mgr.load(1)["w"]
    got[0] = -1.0  # private: never reaches the file
    assert torch.equal(CheckpointManager(str(root), io={"mmap_load": False}).load(1)["w"], want)
    mgr.delete(1)  # deleting the step keeps the mapping valid
    assert got[1:].equal(want[1:])
