"""Process exit with a pending async save: never a manifest for an incomplete step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager

CHILD = Path(__file__).with_name("_async_child.py")
pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


@pytest.mark.parametrize("mode", ["sigkill", "os_exit"])
def test_crash_before_commit_leaves_no_step(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "ck"
    proc = subprocess.run([sys.executable, str(CHILD), str(root), mode], capture_output=True, text=True, timeout=100)
    assert "PENDING" in proc.stdout, proc.stderr[-2000:]
    mgr = CheckpointManager(str(root))
    assert mgr.steps() == [1]
    assert torch.equal(mgr.load(1)["w"], torch.ones(1 << 20))
    mgr.gc(min_age_seconds=0)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-000000000001"]


def test_normal_exit_finishes_the_pending_save(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(root), "normal_exit"], capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    mgr = CheckpointManager(str(root))
    assert mgr.steps() == [1, 2]
    assert torch.equal(mgr.load(2)["w"], torch.full((1 << 20,), 2.0))
