"""User keys never collide with the names ckptstore gives to pieces of a chunked tensor (issue #17, item 5).

A tensor bigger than ``chunk_bytes`` is written as pieces named ``key#<offsets>`` in the shard's safetensors header;
before, a user key such as ``"w#0"`` beside a chunked ``"w"`` failed the save with ``ManifestError`` ("duplicate
tensor name"), which also suggested damage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptstore import CheckpointManager
from ckptstore.format.manifest import step_dir
from ckptstore.io import header_name
from ckptstore.options import IOOptions


@pytest.mark.parametrize("extra", ["w#0", "w#256", "w##0", "w#0,0", "#", "w#"])
def test_a_key_that_looks_like_a_piece_name_round_trips(tmp_path: Path, extra: str) -> None:
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=1024))
    state = {"w": torch.randn(1024), extra: torch.randn(3), "v": {"w#0": torch.arange(5)}}
    mgr.save(1, state)
    out = mgr.load(1)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out[extra], state[extra])
    assert torch.equal(out["v"]["w#0"], state["v"]["w#0"])
    assert len(mgr.manifest(1).tensors["w"].pieces) > 1  # "w" really is chunked
    assert mgr.restore({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    # Every shard still opens with safetensors, each piece and each whole tensor under its own name.
    names: set[str] = set()
    for f in mgr.manifest(1).files:
        with safe_open(str(Path(mgr.storage.full(f"{step_dir(1)}/{f}"))), "pt") as sf:
            names |= set(sf.keys())
    assert header_name(extra) in names and header_name("w", (0,)) in names


def test_header_names_are_unique_by_construction() -> None:
    keys = ["w", "w#0", "w#", "#", "w##0", "a#b"]
    names = [header_name(k) for k in keys] + [header_name(k, (o,)) for k in keys for o in (0, 256)]
    names += [header_name(k, (0, 0)) for k in keys]
    assert len(set(names)) == len(names)
    assert header_name("model/fc.weight") == "model/fc.weight"  # keys without '#' keep their names
