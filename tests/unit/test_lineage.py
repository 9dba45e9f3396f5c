"""Rollback lineage: quarantine of steps that fail verification, superseded timelines, generations of a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointExistsError, IntegrityError
from ckptstore.format.manifest import step_dir


def _st(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((256,), v)}


def _corrupt(mgr: CheckpointManager, step: int) -> None:
    p = mgr.manifest(step).tensors["w"].pieces[0]
    path = Path(mgr.storage.full(f"{step_dir(step)}/{p.file}"))
    data = bytearray(path.read_bytes())
    data[p.start + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_step_that_fails_verification_is_quarantined_and_its_number_saved_again(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    mgr.save(100, _st(1))
    mgr.save(200, _st(2))
    _corrupt(mgr, 200)
    job = CheckpointManager(root, retention={"keep_last": 1})  # the resumed job
    target = _st(0)
    assert job.restore(target).step == 100
    assert job.latest().step == 100  # before: latest() still said 200
    q = job.info(200)
    assert q.quarantined and q.quarantined.startswith("failed verification") and q.verified is False
    assert job.steps() == [100]
    with pytest.raises(IntegrityError):  # asked for by number, the damaged generation is still read and checked
        job.load(200)
    job.save(150, _st(1.5))
    res = job.save(200, _st(2.5))  # before: CheckpointExistsError, the resumed run crashed where it crashed before
    assert res.step == 200
    info = job.latest()
    assert (info.step, info.generation, info.parent) == (200, 2, (150, 1))
    assert torch.equal(CheckpointManager(root).load(200)["w"], _st(2.5)["w"])
    lineage = [(i.step, i.generation, i.parent, bool(i.quarantined)) for i in job.history(include_quarantined=True)]
    # keep_last=1 deleted 100 and 150; the quarantined generation is kept for inspection, never counted
    assert lineage == [(200, 1, (100, 1), True), (200, 2, (150, 1), False)]
    job.gc(min_age_seconds=0)
    assert len(job.history(include_quarantined=True)) == 2  # gc keeps the quarantined generation's files


def test_resuming_from_an_older_step_on_purpose_starts_a_new_timeline(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    for s in (100, 200, 300):
        mgr.save(s, _st(s))
    gen1 = Path(mgr.storage.full(f"{step_dir(200)}/manifest.json")).read_bytes()
    spike = CheckpointManager(root)  # loss spike after 300: go back to 100
    assert spike.restore(_st(0), step=100).step == 100
    spike.save(150, _st(150.5))
    assert spike.latest().step == 150  # 200 and 300 belong to the abandoned timeline
    assert spike.steps() == [100, 150]
    assert "superseded" in spike.info(300).quarantined
    spike.save(200, _st(200.5))
    got = CheckpointManager(root).restore(_st(0))  # a crash now resumes on the new timeline
    assert (got.step, got.generation, got.parent) == (200, 2, (150, 1))
    assert Path(mgr.storage.full(f"{step_dir(200)}/manifest.json")).read_bytes() == gen1  # never changed
    assert torch.equal(CheckpointManager(root).load(300)["w"], _st(300)["w"])  # by number: still readable


def test_a_save_after_a_fallback_in_the_same_process_continues_from_the_restored_step(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(100, _st(1))
    mgr.save(200, _st(2))
    _corrupt(mgr, 200)
    assert mgr.restore(_st(0)).step == 100  # this manager saved 200 itself before the restore fell back
    mgr.save(200, _st(2.5))
    info = mgr.info(200)
    assert (info.generation, info.parent) == (2, (100, 1))  # before: (200, 1), the quarantined generation


def test_committed_verified_steps_stay_immutable(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    mgr.save(100, _st(1))
    mgr.save(200, _st(2))
    with pytest.raises(CheckpointExistsError):
        mgr.save(200, _st(3))
    # Restoring an old step into, say, an evaluation model and training on past every step supersedes nothing.
    other = CheckpointManager(root)
    other.restore(_st(0), step=100)
    other.save(300, _st(3))
    assert other.steps() == [100, 200, 300]
    with pytest.raises(CheckpointExistsError):
        other.save(200, _st(4))


def test_ls_shows_the_lineage(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    mgr.save(100, _st(1))
    mgr.save(200, _st(2))
    job = CheckpointManager(root)
    job.restore(_st(0), step=100)
    job.save(150, _st(1.5))
    job.save(200, _st(2.5))
    run = [sys.executable, "-m", "ckptstore", "ls", root]
    table = subprocess.run([*run, "--all"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "gen" in table and "parent" in table and "superseded" in table
    rows = json.loads(subprocess.run([*run, "--all", "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert [(r["step"], r["generation"], r["parent"], bool(r["quarantined"])) for r in rows] == [
        (100, 1, None, False),
        (150, 1, {"step": 100, "generation": 1}, False),
        (200, 1, {"step": 100, "generation": 1}, True),
        (200, 2, {"step": 150, "generation": 1}, False),
    ]
