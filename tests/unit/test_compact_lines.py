"""Compact rows from the ranks' layout lines (issue #16): with per-rank plans each rank reports its files of
compact parts as ``layout`` lines (``format.compact.PartsFile``), not a piece per part, and rank 0 assembles the
rows with the reader's own index. Real shard files (``io.write_files`` into a local directory); the manifest
made from the lines must be byte-identical to the one made from every explicit piece, and a reader must get the
same tensors back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ckptstore.errors import ManifestError
from ckptstore.format.compact import expand, layout_index
from ckptstore.format.manifest import Manifest, SplitPieces
from ckptstore.format.state import flatten
from ckptstore.io import Source, write_files
from ckptstore.options import IOOptions
from ckptstore.plan import LocalSpec
from ckptstore.save import protocol
from ckptstore.save.plans import LocalPlans
from ckptstore.save.prepare import SaveJob
from ckptstore.storage.local import LocalStorage

OPTS = IOOptions(chunk_bytes=4 << 10, file_bytes=64 << 10, min_split_bytes=1, threads=2)


def full_state(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        out[f"w{i}"] = torch.randn(20 + i, 7, generator=g)  # evenly split, compact
        out[f"b{i}"] = torch.randn(2, generator=g)  # fewer rows than some worlds: empty parts
        out[f"r{i}"] = torch.randn(9, 9, generator=g)  # replicated
    out["big"] = torch.randn(200, 16, generator=g)  # parts over chunk_bytes at world 2: chunk-split, explicit
    return out


def rank_view(state: dict[str, torch.Tensor], rank: int, world: int) -> tuple[list[LocalSpec], dict[str, Source]]:
    specs, sources = [], {}
    for order, (k, t) in enumerate(state.items()):
        if k.startswith("r"):
            local, offs = t, (0,) * t.dim()
        else:
            c = -(-t.shape[0] // world)
            lo = min(rank * c, t.shape[0])
            local, offs = t[lo : lo + c].contiguous(), (lo, *(0,) * (t.dim() - 1))
        specs.append(LocalSpec(k, "float32", 4, tuple(t.shape), offs, tuple(local.shape), order))
        sources[k] = Source(local, offs, t.dtype)
    return specs, sources


def save_both_ways(tmp_path: Path, world: int) -> tuple[bytes, bytes, Manifest, int]:
    lines, pieces, m, n, _, _ = _save_both_ways(tmp_path, world)
    return lines, pieces, m, n


def _save_both_ways(tmp_path: Path, world: int) -> tuple[bytes, bytes, Manifest, int, Manifest, list]:
    state = full_state(6)
    storage = LocalStorage(str(tmp_path))
    attempt = protocol.Attempt(False, 0, "ab12cd34", None, True)
    job = SaveJob.new(3, epoch=None, metrics={}, metadata={})
    job.tree = flatten(state).tree
    lines_reports, piece_reports = [], []
    plans0 = None
    for r in range(world):
        specs, sources = rank_view(state, r, world)
        plans = LocalPlans()
        mine = plans.derive(specs, None, rank=r, world=world)
        assert mine is not None
        files = plans.files(mine, OPTS, save_id=attempt.save_id, rank=r)
        written = write_files(storage, "step-3", files, sources, OPTS)
        w, parts = plans.rows.parts_files(files, written)
        lines_reports.append((w, None if r == 0 else [], (), parts))  # what a rank sends with per-rank plans
        piece_reports.append((written, job.tree, (), []))
        if r == 0:
            plans0, spec_of = plans, {t.key: t for t in mine.layout.tensors}
    assert plans0 is not None
    n_parts_files = sum(len(rep[3]) for rep in lines_reports)
    via_lines = protocol.build_manifest(job, spec_of, lines_reports, attempt, world, plans0.rows)
    via_pieces = protocol.build_manifest(job, spec_of, piece_reports, attempt, world, None)
    all_parts = [pf for rep in lines_reports for pf in rep[3]]
    return via_lines.to_bytes(), via_pieces.to_bytes(), via_lines, n_parts_files, via_pieces, all_parts


@pytest.mark.parametrize("world", [2, 3, 8])
def test_manifest_from_lines_is_the_manifest_from_pieces(tmp_path: Path, world: int) -> None:
    lines, pieces, m, n_parts_files = save_both_ways(tmp_path, world)
    assert n_parts_files >= world  # every rank sent its compact parts as lines
    assert b'"layout":{' in lines and b'"chunk":' in lines
    assert lines == pieces
    assert all(isinstance(m.tensors[f"w{i}"].pieces, SplitPieces) for i in range(6))  # no Piece per part held
    back = Manifest.from_bytes(lines)
    state = full_state(6)
    for key, te in back.tensors.items():
        got = torch.empty(te.shape)
        flat = got.view(-1).view(torch.uint8)
        for p in te.pieces:
            data = (tmp_path / "step-3" / p.file).read_bytes()[p.start : p.end]
            if p.offsets is None:
                flat[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                rows = got[p.offsets[0] : p.offsets[0] + p.shape[0]]
                rows.copy_(torch.frombuffer(bytearray(data), dtype=torch.float32).view(rows.shape))
        assert torch.equal(got, state[key]), key


def test_lines_a_reader_would_refuse_fall_back_to_explicit_pieces(tmp_path: Path) -> None:
    state = full_state(6)
    storage = LocalStorage(str(tmp_path / "again"))
    attempt = protocol.Attempt(False, 0, "ab12cd34", None, True)
    job = SaveJob.new(3, epoch=None, metrics={}, metadata={})
    job.tree = flatten(state).tree
    reports = []
    for r in range(3):
        specs, sources = rank_view(state, r, 3)
        plans = LocalPlans()
        mine = plans.derive(specs, None, rank=r, world=3)
        assert mine is not None
        files = plans.files(mine, OPTS, save_id=attempt.save_id, rank=r)
        w, parts = plans.rows.parts_files(files, write_files(storage, "step-3", files, sources, OPTS))
        if r == 2:  # a line whose crcs are one short: the reader's index refuses it, the save must not commit it
            parts = [dataclasses.replace(p, crcs=p.crcs[:-4], part_crcs=p.part_crcs[:-4]) for p in parts]
        reports.append((w, None if r == 0 else [], (), parts))
        if r == 0:
            rows, spec_of = plans.rows, {t.key: t for t in mine.layout.tensors}
    m = protocol.build_manifest(job, spec_of, reports, attempt, 3, rows)
    assert not any(isinstance(te.pieces, SplitPieces) for te in m.tensors.values())
    with pytest.raises(ManifestError, match=r"gap|cover|pieces"):  # a part lost: the writer refuses the step
        m.to_bytes()


def test_lines_the_index_refuses_become_explicit_pieces_of_the_same_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise ManifestError("too sparse (forced)")

    monkeypatch.setattr(protocol, "layout_index", refuse)
    lines, pieces, m, _ = save_both_ways(tmp_path, 3)
    assert not any(isinstance(te.pieces, SplitPieces) for te in m.tensors.values())
    assert lines == pieces  # the encoder then compacts the explicit pieces as for any manifest


def test_expand_gives_the_explicit_pieces(tmp_path: Path) -> None:
    _, _, m, _, explicit, parts = _save_both_ways(tmp_path, 3)
    keys = [k for k in m.tensors if isinstance(m.tensors[k].pieces, SplitPieces)]
    rows = [(m.tensors[k].shape, m.tensors[k].pieces.chunk, 4) for k in keys]
    assert layout_index(rows, parts, m.files, "t").np == m.tensors[keys[0]].pieces._ix.np
    assert any(pf.k > 1 for pf in parts)  # small parts: one checksum per group of parts in the lines
    got = expand(rows, parts)
    for row, key in enumerate(keys):
        assert sorted(got[row]) == sorted(explicit.tensors[key].pieces), key
