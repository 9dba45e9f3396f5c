"""Grouped checksums in real FSDP2 saves (issue #16): 2 gloo ranks save an FSDP2 model + Adam, the manifest's
layout lines checksum groups of parts (a 6th element ``k``), restores are bit-exact both into FSDP2 shards (each
rank its own parts) and into replicated copies (read once, broadcast), and a flipped byte in an optimizer part
makes a model-only restore of that step fail its group and fall back to the previous step on every rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore.format.manifest import Manifest
from tests.distributed import _group_workers as W
from tests.fixtures.dist import assert_bit_equal, run_ranks, values

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _groups_of(m: Manifest) -> dict[tuple[str, int, int], list[str]]:
    out: dict[tuple[str, int, int], list[str]] = {}
    for k, e in m.tensors.items():
        for p in e.pieces:
            span = getattr(p, "span", None)
            if span is not None:
                out.setdefault((p.file, *span), []).append(k)
    return out


def _manifest(root: Path, step: int) -> tuple[Manifest, dict[str, Any]]:
    raw = (root / f"step-{step:012d}" / "manifest.json").read_bytes()
    return Manifest.from_bytes(raw), json.loads(raw)


def _flip_optimizer_part_next_to_model(root: Path, m: Manifest) -> str:
    for (f, s0, s1), keys in _groups_of(m).items():
        opt = [k for k in keys if k.startswith("optim/")]
        if opt and any(k.startswith("model/") for k in keys):
            p = next(p for p in m.tensors[opt[0]].pieces if p.file == f and p.span == (s0, s1))
            path = root / f"step-{m.step:012d}" / f
            data = bytearray(path.read_bytes())
            data[p.start + p.nbytes // 2] ^= 0x08
            path.write_bytes(bytes(data))
            return opt[0]
    raise AssertionError("no checksum group holds both model and optimizer parts")


def test_fsdp2_grouped_checksums_restore_and_damage(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    full1 = values(run_ranks(W.save, 2, str(root), 1, 1, timeout=200))[0]
    full2 = values(run_ranks(W.save, 2, str(root), 2, 2, timeout=200))[0]
    m, doc = _manifest(root, 2)
    grouped = {f: v for f, v in doc["layout"].items() if len(v) == 6}
    assert len(grouped) == 2 and all(v[5] >= 2 for v in grouped.values()), doc["layout"]  # one file per rank
    assert sum(len(keys) for keys in _groups_of(m).values()) >= 20  # model and optimizer parts in groups
    # Into FSDP2 shards (each rank its own parts, one read per group) and into replicated copies (read once).
    res = values(run_ranks(W.restore_fsdp, 2, str(root), False, timeout=200))
    assert [r["step"] for r in res] == [2, 2]
    assert_bit_equal(res[0]["full"], full2)
    rep = values(run_ranks(W.restore_replicated, 2, str(root), timeout=200))
    assert [r["step"] for r in rep] == [2, 2]
    for r in rep:
        assert_bit_equal(r["model"], full2["model"])
    # A damaged optimizer byte: a restore of the model alone still reads that byte's group, refuses step 2 on
    # every rank and falls back to step 1 (direct reads and read-once alike).
    victim = _flip_optimizer_part_next_to_model(root, m)
    assert victim.startswith("optim/")
    res = values(run_ranks(W.restore_fsdp, 2, str(root), True, timeout=200))
    assert [r["step"] for r in res] == [1, 1]
    assert_bit_equal(res[0]["full"]["model"], full1["model"])
    rep = values(run_ranks(W.restore_replicated, 2, str(root), timeout=200))
    assert [r["step"] for r in rep] == [1, 1]
    for r in rep:
        assert_bit_equal(r["model"], full1["model"])
    assert not torch.equal(full1["model"]["0.weight"], full2["model"]["0.weight"])
