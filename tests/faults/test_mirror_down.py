"""A tiered manager whose mirror is down keeps every step the mirror lacks, retries it, and says so."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import StorageError
from tests.fixtures.faulty import Fault, FaultyStorage

pytestmark = pytest.mark.faults


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((512,), v)}


def _down(mgr: CheckpointManager) -> FaultyStorage:
    """Every write to the mirror fails with EIO until ``clear()``."""
    st = FaultyStorage(mgr.mirror_storage)
    st.add(Fault("eio", op="open_write", times=None), Fault("eio", op="write_bytes", times=None),
           Fault("eio", op="create_exclusive", times=None))  # fmt: skip
    mgr.mirror_storage = st
    return st


def test_mirror_down_local_retention_keeps_unmirrored_steps_and_retries(tmp_path: Path) -> None:
    mirror = f"memory://mirror-{uuid.uuid4().hex}"
    mgr = CheckpointManager(str(tmp_path / "local"), mirror=mirror, retention={"keep_last": 2})
    faulty = _down(mgr)
    for s in (1, 2, 3, 4):
        mgr.save(s, _state(s))
    with pytest.raises(StorageError, match="could not be copied to the mirror") as ei:
        mgr.flush_mirror()
    assert "1" in str(ei.value) and "4" in str(ei.value)
    # Nothing reached the mirror, so local retention deleted nothing.
    assert mgr.steps("mirror") == [] and mgr.steps() == [1, 2, 3, 4]
    faulty.clear()  # the mirror is back
    mgr.save(5, _state(5))  # retries the failed uploads, then uploads 5
    assert mgr.flush_mirror() == [1, 2, 3, 4, 5]
    assert mgr.steps("mirror") == [4, 5]  # the mirror applies keep_last=2 itself
    assert torch.equal(CheckpointManager(mirror).load(4)["w"], _state(4)["w"])
    mgr.save(6, _state(6))
    mgr.flush_mirror()
    assert mgr.steps() == [5, 6]  # everything is mirrored now: local retention runs as usual
    mgr.close()


def test_close_retries_and_surfaces_a_failed_upload(tmp_path: Path) -> None:
    mirror = f"memory://mirror-{uuid.uuid4().hex}"
    mgr = CheckpointManager(str(tmp_path / "local"), mirror=mirror)
    faulty = _down(mgr)
    mgr.save(1, _state(1))
    with pytest.raises(StorageError, match="mirror"):
        mgr.close()
    assert faulty.count("open_write") >= 2  # the upload was tried again at close()
    assert CheckpointManager(str(tmp_path / "local")).steps() == [1]


def test_a_new_process_resumes_uploads_an_earlier_one_did_not_finish(tmp_path: Path) -> None:
    mirror = f"memory://mirror-{uuid.uuid4().hex}"
    mgr = CheckpointManager(str(tmp_path / "local"), mirror=mirror, retention={"keep_last": 1})
    _down(mgr)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    with pytest.raises(StorageError):
        mgr.flush_mirror()
    assert mgr.steps() == [1, 2]
    # The job restarts (a new manager: nothing in memory), the mirror works again.
    again = CheckpointManager(str(tmp_path / "local"), mirror=mirror, retention={"keep_last": 1})
    again.save(3, _state(3))
    again.flush_mirror()
    assert again.steps("mirror") == [3]  # 1 and 2 were uploaded first, then the mirror kept its newest
    again.save(4, _state(4))
    again.flush_mirror()
    assert again.steps() == [4]
    again.close()
