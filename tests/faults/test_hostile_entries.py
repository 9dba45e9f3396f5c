"""Odd entries where a manifest should be (FIFO, link to /dev/zero, directory): resume falls back, nothing hangs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import ManifestError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


def _make(kind: str, path: Path) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        os.symlink("/dev/zero", path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink-to-good":
        os.symlink(path.parent.parent / step_dir(1) / MANIFEST_NAME, path)


@pytest.mark.parametrize("kind", ["fifo", "devzero", "dir", "symlink-to-good"])
def test_odd_newest_manifest_falls_back_and_ls_lists_the_rest(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root))
    mgr.save(1, {"w": torch.full((16,), 1.0)})
    mgr.save(2, {"w": torch.full((16,), 2.0)})
    _make(kind, root / step_dir(2) / MANIFEST_NAME)
    fresh = CheckpointManager(str(root))
    target = {"w": torch.zeros(16)}
    assert fresh.restore(target).step == 1  # the odd entry is damage: latest falls back at once
    assert torch.equal(target["w"], torch.full((16,), 1.0))
    with pytest.raises(ManifestError):
        fresh.load(2)
    assert [i.step for i in fresh.history()] == [1]
    out = subprocess.run(
        [sys.executable, "-m", "ckptstore", "ls", str(root)], capture_output=True, text=True, timeout=30
    )
    assert "1" in out.stdout, out.stdout + out.stderr
