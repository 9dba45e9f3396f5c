"""Tiered manager: commit on the local primary, copy to a mirror in the background, restore from either tier."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import ConfigError


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), v), "b": torch.arange(10.0) * v}


@pytest.fixture
def mirror() -> str:
    return f"memory://mirror-{uuid.uuid4().hex}"


def test_steps_reach_the_mirror_and_a_new_machine_resumes_from_it(tmp_path: Path, mirror: str) -> None:
    with CheckpointManager(str(tmp_path / "local"), mirror=mirror) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(s), epoch=s, metrics={"loss": 1.0 / s})
        assert mgr.flush_mirror() == [1, 2, 3]
        assert mgr.steps("mirror") == [1, 2, 3] and mgr.steps("all") == [1, 2, 3]
        assert mgr.manifest(3).to_bytes() == CheckpointManager(mirror).manifest(3).to_bytes()
    # A new machine: empty local disk, same mirror.
    fresh = CheckpointManager(str(tmp_path / "new-local"), mirror=mirror)
    assert fresh.steps() == [] and fresh.steps("mirror") == [1, 2, 3]
    target = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    info = fresh.restore(target)
    assert info.step == 3 and info.tier == "mirror" and info.url.startswith(mirror)
    assert all(torch.equal(target[k], v) for k, v in _state(3).items())
    assert torch.equal(fresh.load(2)["w"], _state(2)["w"])


def test_corrupt_primary_step_falls_back_to_its_mirror_copy(tmp_path: Path, mirror: str, caplog) -> None:
    mgr = CheckpointManager(str(tmp_path / "local"), mirror=mirror)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    mgr.flush_mirror()
    p = mgr.manifest(2).tensors["w"].pieces[0]
    path = Path(mgr.storage.full(f"step-000000000002/{p.file}"))
    data = bytearray(path.read_bytes())
    data[p.start + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    target = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        info = mgr.restore(target)
    assert info.step == 2 and info.tier == "mirror"  # same step from the other tier, not an older step
    assert torch.equal(target["w"], _state(2)["w"])
    assert any("mirror copy" in r.message for r in caplog.records)
    assert torch.equal(mgr.load(2)["w"], _state(2)["w"])  # explicit step: also served by the mirror copy
    mgr.close()


def test_retention_runs_per_tier_and_never_drops_unmirrored_steps(tmp_path: Path, mirror: str) -> None:
    with CheckpointManager(str(tmp_path / "local"), mirror=mirror, retention={"keep_last": 2}) as mgr:
        for s in range(1, 6):
            mgr.save(s, _state(s))
        mgr.flush_mirror()
        assert mgr.steps() == [4, 5]
        # Every step reached the mirror before the primary dropped it; the mirror keeps its own last 2.
        assert mgr.steps("mirror") == [4, 5]


def test_tiered_from_config(tmp_path: Path, mirror: str) -> None:
    mgr = CheckpointManager.from_config({"root": str(tmp_path / "l"), "mirror": {"url": mirror}})
    assert mgr.tiers == ["primary", "mirror"]
    mgr.save(1, _state(1))
    mgr.close()
    assert CheckpointManager(mirror).steps() == [1]
    with pytest.raises(ConfigError):
        CheckpointManager(str(tmp_path / "l"), mirror=str(tmp_path / "l"))
