"""Process exit with a pending async save: never a manifest for an incomplete step (file:// and s3://)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager
from tests.faults.conftest import Backend

CHILD = Path(__file__).with_name("_async_child.py")
REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def _cmd(root: str, mode: str, opts: dict[str, Any] | None = None) -> list[str]:
    return [sys.executable, str(CHILD), root, mode, *([json.dumps(opts)] if opts else [])]


def _env(overlap: bool = False) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "CKPT_TEST_OVERLAP": "1" if overlap else "0"}


@pytest.mark.parametrize("overlap", [False, True], ids=["staged", "overlap_staging"])
@pytest.mark.parametrize("mode", ["sigkill", "os_exit"])
def test_crash_before_commit_leaves_no_step(tmp_path: Path, mode: str, overlap: bool) -> None:
    root = tmp_path / "ck"
    proc = subprocess.run(_cmd(str(root), mode), capture_output=True, text=True, timeout=100, env=_env(overlap))
    assert "PENDING" in proc.stdout, proc.stderr[-2000:]
    mgr = CheckpointManager(str(root))
    assert mgr.steps() == [1]
    assert torch.equal(mgr.load(1)["w"], torch.ones(1 << 20))
    mgr.gc(min_age_seconds=0)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-000000000001"]


@pytest.mark.parametrize("overlap", [False, True], ids=["staged", "overlap_staging"])
def test_normal_exit_finishes_the_pending_save(tmp_path: Path, overlap: bool) -> None:
    root = tmp_path / "ck"
    proc = subprocess.run(
        _cmd(str(root), "normal_exit"), capture_output=True, text=True, timeout=100, env=_env(overlap)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    mgr = CheckpointManager(str(root))
    assert mgr.steps() == [1, 2]
    assert torch.equal(mgr.load(2)["w"], torch.full((1 << 20,), 2.0))


@pytest.mark.s3
def test_exit_with_pending_async_save_s3(s3_root: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    url, opts = s3_root
    modes = ["sigkill", "normal_exit"]  # (os_exit leaves the storage as sigkill does; file:// runs both)
    procs = {m: subprocess.Popen(_cmd(f"{url}/{m}", m, opts), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=_env()) for m in modes}  # fmt: skip
    outs = {m: p.communicate(timeout=100) for m, p in procs.items()}
    for m in modes:
        assert "PENDING" in outs[m][0], (m, outs[m][1][-2000:])
    assert procs["sigkill"].returncode == -signal.SIGKILL
    assert procs["normal_exit"].returncode == 0, outs["normal_exit"][1][-2000:]
    for m in modes:
        b = Backend("s3", f"{url}/{m}", opts, s3_client=s3_client)
        mgr = b.manager()
        want = [1, 2] if m == "normal_exit" else [1]  # a step is committed only if its save completed
        assert mgr.steps() == want, m
        assert torch.equal(mgr.load(1)["w"], torch.ones(1 << 20))
        if m == "normal_exit":
            assert torch.equal(mgr.load(2)["w"], torch.full((1 << 20,), 2.0))
        mgr.gc(min_age_seconds=0)
        b.only_committed(mgr, want)
