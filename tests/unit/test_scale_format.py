"""Format 2 (issue #16): compact rows of evenly split tensors, the layout that locates their parts, golden
bytes, hostile layouts, restore-side lookups by arithmetic, and the writer refusing what readers refuse."""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ckptstore.format.manifest as mf
from ckptstore import CheckpointManager
from ckptstore.errors import ManifestError
from ckptstore.format.manifest import Manifest, Piece, SplitPieces, TensorEntry, pieces_in_box
from ckptstore.io import Source, plan_fill, read_pieces, write_files
from ckptstore.options import IOOptions
from ckptstore.plan import LocalSpec, plan_writes
from ckptstore.storage.local import LocalStorage
from tests.faults.forge import sign
from tests.unit.test_group_crc import assert_same_parts

GOLDEN = Path(__file__).parent / "golden"
F0, F1, F2 = "shard-00000000-r0-0.safetensors", "shard-00000000-r1-0.safetensors", "shard-00000000-r0-1.safetensors"


def golden_v2() -> Manifest:
    refs = [{"t": "tensor", "key": k} for k in ("w", "e", "b")]
    return Manifest(
        step=8,
        tree={"t": "dict", "k": ["w", "e", "b"], "v": refs},
        tensors={
            "w": TensorEntry(
                "bfloat16",
                (5, 2),
                (Piece(F0, 80, 92, 0x11111111, (0, 0), (3, 2)), Piece(F1, 80, 88, 0x22222222, (3, 0), (2, 2))),
            ),
            "e": TensorEntry(
                "float32", (3,), (Piece(F0, 92, 100, 0x33333333, (0,), (2,)), Piece(F1, 88, 92, 0x44444444, (2,), (1,)))
            ),
            "b": TensorEntry("float32", (4,), (Piece(F2, 80, 96, 0x55555555),)),
        },
        files={F0: 100, F1: 92, F2: 96},
        created_at=1700000000.0,
        world_size=2,
        save_id="00000000",
        versions={"ckptstore": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
    )


def test_v2_golden_bytes_and_round_trip() -> None:
    # The golden of the first format 2 writer (one crc32c per part); today's writer groups those tiny parts (k=2:
    # tests/unit/test_group_crc.py has the golden bytes of grouped lines), the reading is unchanged.
    raw = (GOLDEN / "manifest_v2.json").read_bytes()
    doc = json.loads(raw)
    assert doc["format_version"] == 2
    assert doc["tensors"]["w"] == {"dtype": "bfloat16", "shape": [5, 2], "device": "cpu", "chunk": 3}
    assert "pieces" in doc["tensors"]["b"]  # a whole tensor stays an explicit row
    assert doc["layout"][F0][:4] == [0, 0, 2, 80] and doc["layout"][F1][:4] == [1, 0, 2, 80]
    m = Manifest.from_bytes(raw)
    assert isinstance(m.tensors["w"].pieces, SplitPieces)
    for key, e in golden_v2().tensors.items():
        assert tuple(m.tensors[key].pieces) == e.pieces and m.tensors[key].nbytes == e.nbytes
    # A parsed manifest writes back the bytes it was read from (its lines as they are, one crc32c per part); a
    # fresh writer groups those tiny parts, and reads back the same pieces.
    assert m.nbytes == 48 and m.to_bytes() == raw
    fresh = Manifest.from_bytes(golden_v2().to_bytes())
    assert [(p.file, p.start, p.end, p.offsets) for e in fresh.tensors.values() for p in e.pieces] == [
        (p.file, p.start, p.end, p.offsets) for e in m.tensors.values() for p in e.pieces
    ]
    # Every JSON spelling reads the same.
    for lines in (True, False):
        again = Manifest.from_bytes(sign(doc, lines=lines))
        assert {k: tuple(e.pieces) for k, e in again.tensors.items()} == {
            k: e.pieces for k, e in golden_v2().tensors.items()
        }


def test_v1_still_read_and_written_for_v1_manifests() -> None:
    raw = (GOLDEN / "manifest_v1.json").read_bytes()
    m = Manifest.from_bytes(raw)
    assert m.format_version == 1 and m.to_bytes() == raw
    v1 = Manifest.from_bytes((GOLDEN / "manifest_v2.json").read_bytes())  # one crc32c per part
    v1.format_version = 1
    doc = json.loads(v1.to_bytes())  # a format-1 manifest never has compact rows
    assert doc["format_version"] == 1 and "layout" not in doc and "pieces" in doc["tensors"]["w"]


def _d() -> dict:
    return json.loads((GOLDEN / "manifest_v2.json").read_bytes())


@pytest.mark.parametrize(
    "mutate, err",
    [
        (lambda d: d.update(format_version=1), "format 2"),
        (lambda d: d["tensors"]["w"].update(chunk=0), "chunk"),
        (lambda d: d["tensors"]["w"].update(chunk=6), "chunk"),
        (lambda d: d["tensors"]["w"].update(chunk=2), "bytes of parts|parts"),  # 3 parts, files hold 2
        (lambda d: d["layout"][F0].__setitem__(3, 81), "file has 100 bytes"),
        (lambda d: d["layout"][F0].__setitem__(2, 3), "rows"),
        (lambda d: d["layout"][F0].__setitem__(4, "ERERETMzMw=="), "checksums"),
        (lambda d: d["layout"][F0].__setitem__(4, "not base64!"), "base64"),
        (lambda d: d["layout"].pop(F1), "parts"),
        (lambda d: d["layout"].update({F2: [0, 0, 2, 80, "ERERETMzMzM="]}), "bytes|two files"),
        (lambda d: d["layout"].update({"other.safetensors": [1, 0, 2, 80, "IiIiIkREREQ="]}), "does not list"),
        (lambda d: d["layout"][F1].__setitem__(0, 0), "two files|parts"),
        (lambda d: d["layout"][F0].__setitem__(0, "0"), "integers"),
        (lambda d: d.update(layout=[]), "object"),
        (lambda d: d.update(layout={}), "no part|parts"),
    ],
)
@pytest.mark.parametrize("lines", [True, False], ids=["line-layout", "one-line"])
def test_hostile_v2_layouts_are_manifest_errors(mutate, err: str, lines: bool) -> None:
    d = _d()
    mutate(d)
    with pytest.raises(ManifestError, match=err):
        Manifest.from_bytes(sign(d, lines=lines))


def _fsdp_manifest(parts: int, tensors: int, rows: int = 64, cols: int = 16) -> Manifest:
    """What the manager builds for ``tensors`` float32 (rows, cols) tensors evenly split over ``parts`` ranks, each
    rank writing its parts back to back into one file (as the planner lays them out)."""
    c = -(-rows // parts)
    entries: dict[str, list[Piece]] = {f"t{i}": [] for i in range(tensors)}
    files = {}
    for r in range(parts):
        name = f"shard-abcdef01-r{r}-0.safetensors"
        pos = start = 4096
        for i in range(tensors):
            n = max(0, min(c, rows - r * c))
            if n:
                entries[f"t{i}"].append(
                    Piece(name, pos, pos + n * cols * 4, (r * 7919 + i) & 0xFFFFFFFF, (r * c, 0), (n, cols))
                )
                pos += n * cols * 4
        if pos > start:
            files[name] = pos
    return Manifest(
        step=1,
        tree={"t": "dict", "k": list(entries), "v": [{"t": "tensor", "key": k} for k in entries]},
        tensors={k: TensorEntry("float32", (rows, cols), tuple(v)) for k, v in entries.items()},
        files=files,
        world_size=parts,
    )


def test_compact_manifest_does_not_grow_by_a_row_per_rank_and_parses_lazily() -> None:
    m = _fsdp_manifest(256, 200, rows=512)
    raw = m.to_bytes()
    v1 = Manifest(**{**m.__dict__, "format_version": 1}).to_bytes()
    pieces = sum(len(e.pieces) for e in m.tensors.values())
    assert pieces == 256 * 200
    assert len(raw) < 7 * pieces and len(v1) > 15 * len(raw), (len(raw), len(v1))  # < 5.3 B (a crc32c) per part
    per_part = _per_part_crcs(m)  # the same manifest with one crc32c per part
    assert len(raw) < len(per_part) / 4, (len(raw), len(per_part))  # 200 parts of 128 B: one crc32c per file
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        got = Manifest.from_bytes(raw)
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Memory follows the rows and files, not the parts: within 4x the size the manifest had with a crc32c per
    # part (the rows, the files and the tree cost ~6.5x their own few bytes once the checksums are grouped).
    assert peak < 4 * len(per_part) and peak < 8 * len(raw), (peak, len(raw), len(per_part))
    assert dt < 2.0
    assert_same_parts(got, m)


def _per_part_crcs(m: Manifest) -> bytes:
    old = mf.GROUP_BYTES
    mf.GROUP_BYTES = 0  # k = 1 in every layout line
    try:
        return m.to_bytes()
    finally:
        mf.GROUP_BYTES = old


def test_lookup_of_a_box_touches_only_the_parts_it_needs() -> None:
    m = Manifest.from_bytes(_fsdp_manifest(64, 50).to_bytes())
    e = m.tensors["t17"]
    ix = e.pieces._ix  # type: ignore[attr-defined]
    got = pieces_in_box(e, (5, 0), (1, 16))  # row 5: part 5 of 64 (one row each)
    assert [p.offsets for p in got] == [(5, 0)] and len(ix._pos) == 1  # one file's table built, not 64
    assert [p.offsets[0] for p in pieces_in_box(e, (10, 3), (3, 2))] == [10, 11, 12]
    assert pieces_in_box(e, (0, 0), (0, 16)) == []
    assert sorted(ix._pos) == [5, 10, 11, 12]  # the files of parts 5 and 10..12
    dest = torch.empty((1, 16), dtype=torch.float32)
    tasks = plan_fill("t17", e, dest, (5, 0))
    assert [t.piece.offsets for t in tasks] == [(5, 0)] and sorted(ix._pos) == [5, 10, 11, 12]


def test_planned_writes_round_trip_through_format_2_and_safetensors(tmp_path: Path) -> None:
    # Four simulated FSDP ranks (the real planner, the real writer, the real encoder/decoder and reader).
    world, st = 4, LocalStorage(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    full = {f"layers.{i}.w": torch.randn((10 + i, 6), generator=g) for i in range(5)}
    full["norm"] = torch.randn((7,), generator=g).to(torch.bfloat16)
    full["scalar"] = torch.tensor(3.0)
    specs, sources = [], []
    for r in range(world):
        sp, src = [], {}
        for order, (k, t) in enumerate(full.items()):
            if t.dim() == 0:
                local, offs = t, ()
            else:
                chunks = torch.chunk(t, world)
                c = chunks[0].shape[0]
                local = chunks[r].contiguous() if r < len(chunks) else t[t.shape[0] :]
                offs = (min(r * c, t.shape[0]), *(0,) * (t.dim() - 1))
            dt = str(t.dtype).removeprefix("torch.")
            sp.append(LocalSpec(k, dt, t.element_size(), tuple(t.shape), offs, tuple(local.shape), order))
            src[k] = Source(local, offs, t.dtype)
        specs.append(sp)
        sources.append(src)
    plan = plan_writes(specs, save_id="0badc0de", options=IOOptions())
    pieces: dict[str, list[Piece]] = {}
    files: dict[str, int] = {}
    for r in range(world):
        for wf in write_files(st, "step-000000000001", plan.for_rank(r), sources[r], IOOptions()):
            files[wf.name] = wf.size
            for k, p in wf.pieces:
                pieces.setdefault(k, []).append(p)
    tensors = {}
    for k, t in full.items():
        ps = sorted(pieces[k], key=lambda p: (p.offsets or (), p.file, p.start))
        tensors[k] = TensorEntry(str(t.dtype).removeprefix("torch."), tuple(t.shape), tuple(ps))
    m = Manifest(
        step=1,
        tree={"t": "dict", "k": list(full), "v": [{"t": "tensor", "key": k} for k in full]},
        tensors=tensors,
        files=files,
        world_size=world,
    )
    raw = m.to_bytes()
    doc = json.loads(raw)
    compact = [k for k, row in doc["tensors"].items() if "chunk" in row]
    assert len(compact) == 6, doc["tensors"]  # every split tensor; the scalar stays explicit
    got = Manifest.from_bytes(raw)
    for k, t in full.items():
        e = got.tensors[k]
        dest = torch.empty_like(t)
        read_pieces(st, "step-000000000001", plan_fill(k, e, dest), IOOptions(verify=True), step=1)
        assert torch.equal(dest.view(torch.uint8) if dest.dim() else dest, t.view(torch.uint8) if t.dim() else t), k
        if t.dim():  # one rank's box: only its part is read
            c = torch.chunk(t, world)[0].shape[0]
            part = torch.empty((min(c, t.shape[0] - c), *t.shape[1:]), dtype=t.dtype)
            tasks = plan_fill(k, e, part, (c, *(0,) * (t.dim() - 1)))
            assert len(tasks) == 1
            read_pieces(st, "step-000000000001", tasks, IOOptions(verify=True), step=1)
            assert torch.equal(part, t[c : c + part.shape[0]])
    for name in files:  # every shard file is still a safetensors file
        with safe_open(str(tmp_path / "step-000000000001" / name), framework="pt") as sf:
            assert list(sf.keys())


# -- the writer refuses what readers refuse (one definition of every limit) -----------------------------------------
def test_encoder_refuses_pieces_that_leave_a_gap_or_overlap() -> None:
    base = golden_v2()
    gap = TensorEntry("float32", (4,), (Piece(F2, 80, 88, 1, (0,), (2,)),))  # rows 2..3 missing
    with pytest.raises(ManifestError, match=r"gap|overlap"):
        Manifest(**{**base.__dict__, "tensors": {**base.tensors, "b": gap}}).to_bytes()
    over = TensorEntry("float32", (4,), (Piece(F2, 80, 92, 1, (0,), (3,)), Piece(F2, 84, 96, 2, (1,), (3,))))
    with pytest.raises(ManifestError, match=r"overlap|elements"):
        Manifest(**{**base.__dict__, "tensors": {**base.tensors, "b": over}}).to_bytes()
    outside = TensorEntry("float32", (4,), (Piece(F2, 88, 104, 1),))
    with pytest.raises(ManifestError, match="outside"):
        Manifest(**{**base.__dict__, "tensors": {**base.tensors, "b": outside}}).to_bytes()
    with pytest.raises(ManifestError, match="device"):
        Manifest(
            **{**base.__dict__, "tensors": {**base.tensors, "b": base.tensors["b"]._replace(device="x" * 80)}}
        ).to_bytes()


def test_save_refuses_shard_headers_readers_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptstore.format.safetensors as sft

    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, {"w": torch.ones(3)})
    monkeypatch.setattr(sft, "MAX_HEADER_BYTES", 256)  # the one limit, lowered: 40 tensors' header is larger
    state = {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(40)}
    with pytest.raises(ManifestError, match="MAX_HEADER_BYTES"):
        mgr.save(2, state)
    assert mgr.steps() == [1]
    assert not list(tmp_path.glob("step-000000000002/manifest*"))
    monkeypatch.undo()
    mgr.save(2, state)
    assert mgr.steps() == [1, 2]


def test_save_refuses_a_manifest_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(str(tmp_path))
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 2000)
    with pytest.raises(ManifestError, match="MAX_MANIFEST_BYTES"):
        mgr.save(1, {f"t{i}": torch.zeros(1) for i in range(50)})
    assert mgr.steps() == []


def test_nbytes_of_a_compact_manifest_needs_no_pieces() -> None:
    m = Manifest.from_bytes(_fsdp_manifest(128, 20).to_bytes())
    assert m.nbytes == 20 * 64 * 16 * 4
    ix = next(iter(m.tensors.values())).pieces._ix  # type: ignore[attr-defined]
    assert not ix._pos and math.isclose(m.nbytes, sum(e.nbytes for e in m.tensors.values()))


@pytest.mark.parametrize("mode, world", [("ddp", 128), ("fsdp2", 64), ("fsdp2", 3)])
def test_real_plans_encode_to_layouts_their_reader_accepts(mode: str, world: int) -> None:
    # The planner's files for a Llama-shaped state (2 layers): replicated chunks balanced over ranks (DDP, parts
    # of several chunk counts in one file) or every rank's parts (FSDP2); encoded compact, read back equal.
    from benchmarks.scale import _build_manifest, local_specs, state_tensors
    from ckptstore.plan import layout_from_local, plan_layout

    tensors = state_tensors("8b", 2)
    cplan = plan_layout(layout_from_local(local_specs(mode, tensors, 0, world), 0, world), IOOptions())
    m = _build_manifest(cplan, world, tensors, True)
    raw = m.to_bytes()
    doc = json.loads(raw)
    assert doc["format_version"] == 2 and doc.get("layout")
    got = Manifest.from_bytes(raw)
    assert_same_parts(got, m)
    assert got.nbytes == m.nbytes


def _split_manifest(world: int, shapes: list[tuple[int, int]]) -> Manifest:
    """Every tensor split with torch.chunk sizes over ``world`` ranks, each rank's parts back to back in its file."""
    entries: dict[str, list[Piece]] = {f"t{i}": [] for i in range(len(shapes))}
    files = {}
    for r in range(world):
        name, pos = f"shard-abcdef01-r{r}-0.safetensors", 4096
        for i, (rows, cols) in enumerate(shapes):
            c = -(-rows // world)
            n = max(0, min(c, rows - r * c))
            if n:
                entries[f"t{i}"].append(Piece(name, pos, pos + n * cols * 4, r + i, (r * c, 0), (n, cols)))
                pos += n * cols * 4
        if pos > 4096:
            files[name] = pos
    return Manifest(
        step=1,
        tree={"t": "dict", "k": list(entries), "v": [{"t": "tensor", "key": k} for k in entries]},
        tensors={f"t{i}": TensorEntry("float32", shapes[i], tuple(entries[f"t{i}"])) for i in range(len(shapes))},
        files=files,
        world_size=world,
    )


def test_sparse_layouts_are_refused_and_never_written() -> None:
    # 300 two-part rows between two rows of 64 parts: ranks 2..63 would each span 302 rows for 2 parts, more
    # than the reader's span budget; the writer's own check refuses that layout and writes the rows explicitly.
    m = _split_manifest(64, [(64, 4)] + [(2, 4)] * 300 + [(64, 4)])
    raw = m.to_bytes()
    doc = json.loads(raw)
    # Ranks 0 and 1 hold parts of every row in one file, so no subset of the rows is a run: all explicit.
    assert not any("chunk" in row for row in doc["tensors"].values()) and "layout" not in doc
    got = Manifest.from_bytes(raw)
    assert {k: tuple(e.pieces) for k, e in got.tensors.items()} == {k: e.pieces for k, e in m.tensors.items()}
    # Written with every row compact (what a hostile writer could do), the reader refuses it by its span.
    import ckptstore.format.manifest as mfm

    lines = mfm._compact_rows(m, 0, check=False)[1]
    assert lines
    d = json.loads(raw)
    for k, e in m.tensors.items():
        d["tensors"][k] = {"dtype": "float32", "shape": list(e.shape), "device": "cpu", "chunk": 1}
    d["layout"] = {}
    for line in lines:
        name, v = line.strip().split(":", 1)
        d["layout"][json.loads(name)] = json.loads(v)
    d = {k: d[k] for k in [*[k for k in d if k not in ("layout", "tree", "extras")], "layout", "tree", "extras"]}
    with pytest.raises(ManifestError, match="too sparse"):
        Manifest.from_bytes(sign(d))
