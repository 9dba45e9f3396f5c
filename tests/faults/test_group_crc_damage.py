"""Damage inside a checksum group (format 2 layout lines with a group size ``k``, issue #16): one crc32c covers
``k`` neighbouring parts of a shard file, so a flipped byte in any part of a group fails the read of every part
of it — even a restore that never asks for the damaged tensor refuses the step and falls back to the previous
one, and ``verify`` reports the group. Real files from the real planner, writer and encoder (4 simulated FSDP2
ranks, ``tests.unit.test_group_crc``), restored through ``CheckpointManager``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import IntegrityError
from ckptstore.format.manifest import Manifest, Piece
from ckptstore.io import plan_fill, read_pieces
from ckptstore.options import IOOptions
from ckptstore.storage.local import LocalStorage
from ckptstore.transfer import verify_step
from tests.unit.test_group_crc import _full_state, _groups_of, _save_simulated

pytestmark = pytest.mark.faults


def flip_in_neighbour(root: Path, m: Manifest, victim: str) -> tuple[str, Piece]:
    """Flip a byte of a part of ``victim`` that shares its group with parts of other tensors; returns
    (another key of that group, its piece there)."""
    for (f, s0, s1), keys in _groups_of(m).items():
        if victim in keys and len(set(keys)) > 1:
            p = next(p for p in m.tensors[victim].pieces if p.file == f and p.span == (s0, s1))
            path = root / f"step-{m.step:012d}" / f
            data = bytearray(path.read_bytes())
            data[p.start + p.nbytes // 2] ^= 0x10
            path.write_bytes(bytes(data))
            other = next(k for k in keys if k != victim)
            return other, next(q for q in m.tensors[other].pieces if q.file == f)
    raise AssertionError(f"no group holds {victim!r} and another tensor")


def test_a_damaged_neighbour_part_fails_its_group_and_restore_falls_back(tmp_path: Path) -> None:
    st = LocalStorage(str(tmp_path))
    full1, full2 = _full_state(1), _full_state(2)
    _save_simulated(st, 1, full1)
    _save_simulated(st, 2, full2)
    m2 = Manifest.from_bytes((tmp_path / "step-000000000002" / "manifest.json").read_bytes())
    mgr = CheckpointManager(str(tmp_path))
    state = {k: torch.zeros_like(t) for k, t in full1.items()}
    assert mgr.restore(state).step == 2 and all(torch.equal(state[k], full2[k]) for k in full2)
    assert verify_step(st, 2).ok
    other, q = flip_in_neighbour(tmp_path, m2, "layers.0.w")
    # Reading only the other tensor's part (its own bytes intact) fails: its group's checksum covers the flip.
    dest = torch.empty(q.shape or (), dtype=full2[other].dtype)
    with pytest.raises(IntegrityError, match="group of parts") as ei:
        read_pieces(st, "step-000000000002", plan_fill(other, m2.tensors[other], dest, q.offsets), IOOptions(),
                    step=2)  # fmt: skip
    assert ei.value.file == q.file and ei.value.step == 2
    # A restore that does not even ask for the damaged tensor refuses step 2 and falls back to step 1, bit-exact.
    state = {other: torch.zeros_like(full1[other])}
    info = mgr.restore(state, strict=False)
    assert info.step == 1 and torch.equal(state[other], full1[other])
    res = verify_step(st, 2)
    assert not res.ok and any("checksum group" in p.message and p.file == q.file for p in res.problems), res.problems
    assert verify_step(st, 1).ok
    mgr.close()


def test_hf_export_streams_grouped_parts_and_refuses_a_damaged_group(tmp_path: Path) -> None:
    # "emb" (800 KB) is larger than the 64 KiB read batch: streamed part by part, each part's group read around it.
    from safetensors.torch import load_file

    from ckptstore.hf import export_hf

    st = LocalStorage(str(tmp_path / "ck"))
    full = _full_state(4)
    m = _save_simulated(st, 1, full)
    only_emb = {"key_map": lambda k: k if k == "emb" else None, "select": None, "read_batch_bytes": 64 << 10}
    export_hf(str(tmp_path / "ck"), 1, tmp_path / "hf", **only_emb)
    assert torch.equal(load_file(str(tmp_path / "hf" / "model.safetensors"))["emb"], full["emb"])
    got = Manifest.from_bytes((tmp_path / "ck" / "step-000000000001" / "manifest.json").read_bytes())
    assert all(p.span is not None for p in got.tensors["emb"].pieces)
    flip_in_neighbour(tmp_path / "ck", got, "layers.3.w")  # another tensor's part in a group of emb's
    with pytest.raises(IntegrityError, match="checked as the group of parts"):
        export_hf(str(tmp_path / "ck"), 1, tmp_path / "hf2", **only_emb)
    assert not (tmp_path / "hf2").exists() and m.step == 1
