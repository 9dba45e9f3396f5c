"""Format 2 layout lines with a group size ``k`` (issue #16): one crc32c per group of ``k`` consecutive parts of a
file instead of one per part. Golden bytes, the old 5-element lines reading as before, hostile group sizes and
counts, and real files (the real planner, writer, encoder and reader): restores bit-exact, every group read and
checked once, and a damaged byte anywhere in a group failing the read of any part of it (restore falls back,
``verify`` reports it)."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import crc32c as crc_lib
import pytest
import torch

import ckptstore.format.manifest as mf
from ckptstore.errors import IntegrityError, ManifestError
from ckptstore.format.crc import crc32c_combine, crc32c_groups
from ckptstore.format.manifest import Manifest, Piece, SplitPieces, TensorEntry
from ckptstore.io import Source, plan_fill, read_pieces, write_files
from ckptstore.options import IOOptions
from ckptstore.plan import LocalSpec, plan_writes
from ckptstore.storage.local import LocalStorage
from tests.faults.forge import resign, sign

GOLDEN = Path(__file__).parent / "golden"
F0, F0B = "shard-00000000-r0-0.safetensors", "shard-00000000-r0-1.safetensors"
F1, F2 = "shard-00000000-r1-0.safetensors", "shard-00000000-r0-2.safetensors"
A, BIG = 153600 * 4, 196608 * 4  # part bytes of row "a" (600 KiB) and of rows "big" and "d" (768 KiB)


def golden_groups() -> Manifest:
    """Two ranks. F0 holds part 0 of row a (one part: the 5-element line); F0B part 0 of rows big, b, c, d (768
    KiB, 16 B, 16 B, 768 KiB: groups of k=3 fit in GROUP_BYTES, the last group is d alone and carries its own
    crc32c); F1 part 1 of all five (600 KiB next to 768 KiB: no group of two fits, k=1, the 5-element line); F2
    the scalar "s" (an explicit row)."""
    keys = ["a", "big", "b", "c", "d", "s"]

    def parts(cols: int, crc0: int, crc1: int, at0: int, at1: int, f0: str = F0B) -> tuple[Piece, ...]:
        n = cols * 4
        return (
            Piece(f0, at0, at0 + n, crc0, (0, 0), (1, cols)),
            Piece(F1, at1, at1 + n, crc1, (1, 0), (1, cols)),
        )

    return Manifest(
        step=9,
        tree={"t": "dict", "k": keys, "v": [{"t": "tensor", "key": k} for k in keys]},
        tensors={
            "a": TensorEntry("float32", (2, 153600), parts(153600, 0x0A0A0A0A, 0x1A1A1A1A, 80, 80, F0)),
            "big": TensorEntry("float32", (2, 196608), parts(196608, 0x0D0D0D0D, 0x1D1D1D1D, 80, 80 + A)),
            "b": TensorEntry("float32", (2, 4), parts(4, 0x0B0B0B0B, 0x1B1B1B1B, 80 + BIG, 80 + A + BIG)),
            "c": TensorEntry("float32", (2, 4), parts(4, 0x0C0C0C0C, 0x1C1C1C1C, 96 + BIG, 96 + A + BIG)),
            "d": TensorEntry("float32", (2, 196608), parts(196608, 0x0E0E0E0E, 0x1E1E1E1E, 112 + BIG, 112 + A + BIG)),
            "s": TensorEntry("float32", (), (Piece(F2, 80, 84, 0x55555555),)),
        },
        files={F0: 80 + A, F0B: 112 + 2 * BIG, F1: 112 + A + 2 * BIG, F2: 84},
        created_at=1700000000.0,
        world_size=2,
        save_id="00000000",
        versions={"ckptstore": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
    )


def test_combine_and_groups_are_the_crc32c_of_the_bytes_back_to_back() -> None:
    rng = random.Random(5)
    for _ in range(200):
        a, b = os.urandom(rng.randint(0, 40)), os.urandom(rng.choice([0, 1, 7, 64, 1000, 5000]))
        assert crc32c_combine(crc_lib.crc32c(a), crc_lib.crc32c(b), len(b)) == crc_lib.crc32c(a + b)
    parts = [os.urandom(rng.choice([0, 2, 16, 333, 4096])) for _ in range(97)]
    crcs, lens = [crc_lib.crc32c(p) for p in parts], [len(p) for p in parts]
    for k in (1, 2, 3, 10, 96, 97, 500):
        want = [crc_lib.crc32c(b"".join(parts[i : i + k])) for i in range(0, len(parts), k)]
        assert crc32c_groups(crcs, lens, k) == want, k


def _group_crc(at: dict[tuple[str, int], Piece], f: str, s0: int, s1: int) -> int:
    """The crc32c of bytes [s0, s1) of ``f`` folded from per-part crcs (``at``: explicit pieces by file, start)."""
    crc, pos = 0, s0
    while pos < s1:
        p = at[(f, pos)]
        crc, pos = crc32c_combine(crc, p.crc32c, p.nbytes), p.end
    assert pos == s1
    return crc


def assert_same_parts(got: Manifest, want: Manifest) -> None:
    """``got`` (parsed) holds ``want``'s pieces; a part checked by a group carries the group's crc32c."""
    at = {(p.file, p.start): p for e in want.tensors.values() for p in e.pieces}
    done: dict[tuple[str, int, int], int] = {}
    for key, e in want.tensors.items():
        gp = tuple(got.tensors[key].pieces)
        assert len(gp) == len(e.pieces), key
        for g, w in zip(gp, e.pieces):
            assert g[:3] == w[:3] and g.offsets == w.offsets and g.shape == w.shape, key
            if g.span is None:
                assert g.crc32c == w.crc32c, key
            else:
                assert g.span[0] <= g.start < g.end <= g.span[1] and g.span != (g.start, g.end)
                span = (g.file, *g.span)
                if span not in done:
                    done[span] = _group_crc(at, *span)  # type: ignore[arg-type]
                assert g.crc32c == done[span], key


def test_golden_bytes_with_groups() -> None:
    raw = golden_groups().to_bytes()
    assert raw == (GOLDEN / "manifest_v2_groups.json").read_bytes()
    doc = json.loads(raw)
    g0 = crc32c_combine(crc32c_combine(0x0D0D0D0D, 0x0B0B0B0B, 16), 0x0C0C0C0C, 16)

    def b64(hexs: str) -> str:
        return base64.b64encode(bytes.fromhex(hexs)).decode()

    assert doc["layout"] == {
        F0: [0, 0, 1, 80, b64("0a0a0a0a")],
        F0B: [0, 1, 5, 80, b64(f"{g0:08x}0e0e0e0e"), 3],
        F1: [1, 0, 5, 80, b64("1a1a1a1a1d1d1d1d1b1b1b1b1c1c1c1c1e1e1e1e")],
    }
    m = Manifest.from_bytes(raw)
    group = [m.tensors[k].pieces[0] for k in ("big", "b", "c")]
    assert all(p.span == (80, 112 + BIG) and p.crc32c == g0 for p in group)
    d0 = m.tensors["d"].pieces[0]
    assert d0.span is None and d0.crc32c == 0x0E0E0E0E  # the last group holds one part: its own crc
    assert m.tensors["a"].pieces[0].span is None  # F0: k=1
    assert all(p.span is None for k in "a big b c d".split() for p in m.tensors[k].pieces[1:])  # F1: k=1
    assert_same_parts(m, golden_groups())
    assert m.to_bytes() == raw  # a parsed manifest writes back the bytes it was read from
    for lines in (True, False):  # every JSON spelling reads the same
        again = Manifest.from_bytes(sign(doc, lines=lines))
        assert {k: tuple(e.pieces) for k, e in again.tensors.items()} == {
            k: tuple(e.pieces) for k, e in m.tensors.items()
        }


def test_lines_without_k_still_read_identically() -> None:
    # The format-2 golden from before groups: one crc32c per part, every piece checked by its own bytes.
    from tests.unit.test_scale_format import golden_v2

    raw = (GOLDEN / "manifest_v2.json").read_bytes()
    assert all(len(v) == 5 for v in json.loads(raw)["layout"].values())
    m = Manifest.from_bytes(raw)
    want = golden_v2()
    for key, e in want.tensors.items():
        assert tuple(m.tensors[key].pieces) == e.pieces
        assert all(p.span is None and p.checked == (p.start, p.end) for p in m.tensors[key].pieces)
    doc = json.loads(raw)
    for lines in (True, False):
        again = Manifest.from_bytes(sign(doc, lines=lines))
        assert {k: tuple(e.pieces) for k, e in again.tensors.items()} == {k: e.pieces for k, e in want.tensors.items()}
    # Written today, the same manifest groups its tiny parts (k=2 in both files).
    new = json.loads(want.to_bytes())
    assert [v[5] for v in new["layout"].values()] == [2, 2]
    assert_same_parts(Manifest.from_bytes(want.to_bytes()), want)


def _raw_groups() -> bytes:
    return (GOLDEN / "manifest_v2_groups.json").read_bytes()


@pytest.mark.parametrize(
    "old, new, err",
    [
        ('",3]', '",0]', "group size k=0"),
        ('",3]', '",1]', "group size k=1"),
        ('",3]', f'",{mf.MAX_GROUP_PARTS + 1}]', "group size"),
        ('",3]', '",99999999999999999999]', "is not"),  # 20 digits: no integer of the format
        ('",3]', '",4]', "2 checksums for 4 parts in groups of 4"),
        ('",3]', '",5]', "groups its checksums by k=5 parts, but the file holds 4"),
        ('",3]', '"]', "more than 8 parts"),  # the 5-element spelling: a crc per part, 2 for 4 parts
        ('",3]', '",3,3]', "is not"),
        ('",3]', '",03]', "is not"),
        ('",3]', '",-3]', "is not"),
        ('CgoKCg=="]', 'CgoKCg==",2]', "groups its checksums by k=2 parts, but the file holds 1"),
    ],
)
def test_hostile_group_sizes_in_layout_lines(old: str, new: str, err: str) -> None:
    raw = _raw_groups()
    assert raw.count(old.encode()) == 1
    with pytest.raises(ManifestError, match=err):
        Manifest.from_bytes(resign(raw.replace(old.encode(), new.encode())))


@pytest.mark.parametrize(
    "mutate, err",
    [
        (lambda lay: lay[F0B].__setitem__(5, "2"), "group size"),
        (lambda lay: lay[F0B].__setitem__(5, 2.0), "group size"),
        (lambda lay: lay[F0B].__setitem__(5, True), "group size"),
        (lambda lay: lay[F0B].__setitem__(5, -1), "group size"),
        (lambda lay: lay[F0B].__setitem__(5, 10**30), "group size"),
        (lambda lay: lay[F0B].__setitem__(5, None), "group size"),
        (lambda lay: lay[F0B].__setitem__(5, 4), "checksums"),
        (lambda lay: lay[F0B].append(2), "must be"),
        (lambda lay: lay[F1].append(2), "5 checksums for 5 parts in groups of 2"),
        (lambda lay: lay[F1].append(5), "5 checksums for 5 parts in groups of 5"),
    ],
)
@pytest.mark.parametrize("lines", [True, False], ids=["line-layout", "one-line"])
def test_hostile_group_sizes_in_json(mutate: Any, err: str, lines: bool) -> None:
    doc = json.loads(_raw_groups())
    mutate(doc["layout"])
    with pytest.raises(ManifestError, match=err):
        Manifest.from_bytes(sign(doc, lines=lines))


def test_group_checksums_are_never_written_where_they_would_mean_something_else() -> None:
    m = Manifest.from_bytes(_raw_groups())
    m.format_version = 1  # format 1 has no layout: a group's crc32c cannot be stated per piece
    with pytest.raises(ManifestError, match="checksum of a group of parts"):
        m.to_bytes()
    m = Manifest.from_bytes(_raw_groups())
    # Tuples of the parsed pieces (group crcs and spans) instead of SplitPieces: written back as the same groups.
    m.tensors = {k: TensorEntry(e.dtype, e.shape, tuple(e.pieces), e.device) for k, e in m.tensors.items()}
    assert m.to_bytes() == _raw_groups()
    # Spans that are not groups of k consecutive parts of the file: refused, never re-checksummed.
    b0, *b_rest = m.tensors["b"].pieces
    m.tensors["b"] = TensorEntry("float32", (2, 4), (b0._replace(span=(80, 90)), *b_rest))
    with pytest.raises(ManifestError, match="not groups of k consecutive parts"):
        m.to_bytes()


# -- real files ---------------------------------------------------------------------------------------------------
WORLD = 4


def _full_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = {f"layers.{i}.w": torch.randn((10 + i, 6), generator=g) for i in range(5)}
    full["norm"] = torch.randn((7,), generator=g).to(torch.bfloat16)
    full["emb"] = torch.randn((4 * 100, 512), generator=g)  # parts of 200 KiB: k = 5 in every rank's file
    full["scalar"] = torch.tensor(3.0 + seed)
    return full


def _save_simulated(st: LocalStorage, step: int, full: dict[str, torch.Tensor]) -> Manifest:
    """What a 4-rank FSDP2 save commits: every rank's dim-0 shards written by the real planner and writer, the
    manifest encoded by the real encoder (compact rows, grouped checksums) and committed as ``manifest.json``."""
    specs, sources = [], []
    for r in range(WORLD):
        sp, src = [], {}
        for order, (k, t) in enumerate(full.items()):
            if t.dim() == 0:
                local, offs = t, ()
            else:
                chunks = torch.chunk(t, WORLD)
                c = chunks[0].shape[0]
                local = chunks[r].contiguous() if r < len(chunks) else t[t.shape[0] :]
                offs = (min(r * c, t.shape[0]), *(0,) * (t.dim() - 1))
            dt = str(t.dtype).removeprefix("torch.")
            sp.append(LocalSpec(k, dt, t.element_size(), tuple(t.shape), offs, tuple(local.shape), order))
            src[k] = Source(local, offs, t.dtype)
        specs.append(sp)
        sources.append(src)
    sid = f"{step:08x}"
    plan = plan_writes(specs, save_id=sid, options=IOOptions())
    prefix = f"step-{step:012d}"
    pieces: dict[str, list[Piece]] = {}
    files: dict[str, int] = {}
    for r in range(WORLD):
        for wf in write_files(st, prefix, plan.for_rank(r), sources[r], IOOptions()):
            files[wf.name] = wf.size
            for k, p in wf.pieces:
                pieces.setdefault(k, []).append(p)
    tensors = {
        k: TensorEntry(
            str(t.dtype).removeprefix("torch."),
            tuple(t.shape),
            tuple(sorted(pieces[k], key=lambda p: (p.offsets or (), p.file, p.start))),
        )
        for k, t in full.items()
    }
    m = Manifest(
        step=step,
        tree={"t": "dict", "k": list(full), "v": [{"t": "tensor", "key": k} for k in full]},
        tensors=tensors,
        files=files,
        world_size=WORLD,
        save_id=sid,
    )
    raw = m.to_bytes()
    with open(os.path.join(st.root, prefix, mf.MANIFEST_NAME), "wb") as f:
        f.write(raw)
    return m


class CountingStorage(LocalStorage):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, rel: str, offset: int, buffers: Any) -> None:
        self.reads.append((rel.rsplit("/", 1)[1], offset, sum(b.nbytes for b in buffers)))
        super().read_into(rel, offset, buffers)


def _groups_of(m: Manifest) -> dict[tuple[str, int, int], list[str]]:
    out: dict[tuple[str, int, int], list[str]] = {}
    for k, e in m.tensors.items():
        for p in e.pieces:
            if p.span is not None:
                out.setdefault((p.file, *p.span), []).append(k)
    return out


def _rank_box(t: torch.Tensor, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    c = torch.chunk(t, WORLD)[0].shape[0]
    lo = min(r * c, t.shape[0])
    return (lo, *(0,) * (t.dim() - 1)), (max(0, min(c, t.shape[0] - lo)), *t.shape[1:])


def test_real_files_restore_bit_exact_each_group_read_once(tmp_path: Path) -> None:
    st = CountingStorage(str(tmp_path))
    full = _full_state(0)
    want = _save_simulated(st, 1, full)
    raw = (tmp_path / "step-000000000001" / "manifest.json").read_bytes()
    doc = json.loads(raw)
    ks = [v[5] if len(v) == 6 else 1 for v in doc["layout"].values()]
    assert len(ks) == WORLD and all(k >= 2 for k in ks), doc["layout"]  # every rank's file: grouped crcs
    got = Manifest.from_bytes(raw)
    assert isinstance(got.tensors["emb"].pieces, SplitPieces)
    assert_same_parts(got, want)
    groups = _groups_of(got)
    assert groups and all(len(v) >= 2 for v in groups.values())
    assert all(s1 - s0 <= mf.GROUP_BYTES for _, s0, s1 in groups)
    # Each rank restores its own box of every tensor: its parts, consecutive in its file, so every group is
    # read exactly once (no part's group re-read for its neighbours) and nothing else of the file.
    for r in range(WORLD):
        st.reads.clear()
        tasks, dests = [], {}
        for k, t in full.items():
            if t.dim() == 0:
                continue
            offs, shape = _rank_box(t, r)
            dests[k] = torch.empty(shape, dtype=t.dtype)
            tasks += plan_fill(k, got.tensors[k], dests[k], offs)
        read_pieces(st, "step-000000000001", tasks, IOOptions(verify=True), step=1)
        for k, d in dests.items():
            offs, shape = _rank_box(full[k], r)
            assert torch.equal(d.view(torch.uint8), full[k][offs[0] : offs[0] + shape[0]].view(torch.uint8)), k
        mine = {g for g in groups if g[0] in {t.piece.file for t in tasks}}
        read_bytes = sum(n for _, _, n in st.reads)
        assert read_bytes == sum(s1 - s0 for _, s0, s1 in mine) + sum(
            t.piece.nbytes for t in tasks if t.piece.span is None
        )
        covered: list[tuple[str, int, int]] = []  # the reads never overlap: no byte read twice
        for f, off, n in sorted(st.reads):
            assert not covered or covered[-1][0] != f or covered[-1][2] <= off
            covered.append((f, off, off + n))
    # One tensor's part alone: its group is read (bounded over-read), once.
    st.reads.clear()
    offs, shape = _rank_box(full["layers.2.w"], 1)
    dest = torch.empty(shape)
    tasks = plan_fill("layers.2.w", got.tensors["layers.2.w"], dest, offs)
    (p,) = [t.piece for t in tasks]
    assert p.span is not None
    read_pieces(st, "step-000000000001", tasks, IOOptions(verify=True), step=1)
    assert sum(n for _, _, n in st.reads) == p.span[1] - p.span[0] <= mf.GROUP_BYTES
    assert torch.equal(dest, full["layers.2.w"][offs[0] : offs[0] + shape[0]])
    # Not verifying: only the part's own bytes.
    st.reads.clear()
    read_pieces(st, "step-000000000001", tasks, IOOptions(verify=False), step=1)
    assert sum(n for _, _, n in st.reads) == p.nbytes
    # The same piece wanted twice (two destinations): read once, copied.
    st.reads.clear()
    d2 = torch.empty(shape)
    read_pieces(st, "step-000000000001", tasks + plan_fill("layers.2.w", got.tensors["layers.2.w"], d2, offs),
                IOOptions(verify=True), step=1)  # fmt: skip
    assert sum(n for _, _, n in st.reads) == p.span[1] - p.span[0] and torch.equal(d2, dest)


class RemoteLikeStorage(CountingStorage):
    """Local files read as a remote backend is: no slice-wise reads (one request per coalesced run)."""

    small_reads_cheap = False


def _flip(root: Path, step: int, p: Piece) -> None:
    path = root / f"step-{step:012d}" / p.file
    data = bytearray(path.read_bytes())
    data[p.start] ^= 0x01
    path.write_bytes(bytes(data))


def _all_tasks(m: Manifest, full: dict[str, torch.Tensor]) -> tuple[list, dict[str, torch.Tensor]]:
    dests = {k: torch.empty_like(t) for k, t in full.items()}
    tasks = [t for k in full for t in plan_fill(k, m.tensors[k], dests[k])]
    return tasks, dests


def test_remote_reads_coalesce_groups_and_check_each(tmp_path: Path) -> None:
    st = RemoteLikeStorage(str(tmp_path))
    full = _full_state(5)
    _save_simulated(st, 1, full)
    m = Manifest.from_bytes((tmp_path / "step-000000000001" / "manifest.json").read_bytes())
    tasks, dests = _all_tasks(m, full)
    st.reads.clear()
    read_pieces(st, "step-000000000001", tasks, IOOptions(verify=True), step=1)
    assert all(torch.equal(dests[k].view(torch.uint8), full[k].view(torch.uint8)) for k in full if full[k].dim())
    grouped_files = {f for f, _, _ in _groups_of(m)}
    # One request per file holding groups (its groups are neighbours, together under read_chunk_bytes).
    assert sorted(f for f, _, _ in st.reads if f in grouped_files) == sorted(grouped_files)
    q = next(p for p in m.tensors["norm"].pieces if p.span is not None)
    _flip(tmp_path, 1, next(p for p in m.tensors["emb"].pieces if p.file == q.file))  # emb's part in norm's file
    tasks, _ = _all_tasks(m, full)
    with pytest.raises(IntegrityError, match="group of parts"):
        read_pieces(st, "step-000000000001", tasks, IOOptions(verify=True), step=1)


def test_a_group_larger_than_a_read_request_is_read_range_by_range(tmp_path: Path, monkeypatch) -> None:
    # Groups of up to 64 MiB (a writer with another GROUP_BYTES, or a hostile one): still read and checked, in
    # read_chunk_bytes ranges into the destinations and one reused scratch buffer.
    monkeypatch.setattr(mf, "GROUP_BYTES", 64 << 20)
    st = CountingStorage(str(tmp_path))
    full = _full_state(6)
    full["emb"] = torch.randn((4 * 800, 512))  # 1.6 MB parts: every rank's group is over 1 MiB
    _save_simulated(st, 1, full)
    m = Manifest.from_bytes((tmp_path / "step-000000000001" / "manifest.json").read_bytes())
    spans = _groups_of(m)
    assert spans and all(s1 - s0 > 1 << 20 for _, s0, s1 in spans)
    tasks, dests = _all_tasks(m, full)
    st.reads.clear()
    read_pieces(st, "step-000000000001", tasks, IOOptions(verify=True, read_chunk_bytes=1 << 20), step=1)
    assert all(torch.equal(dests[k].view(torch.uint8), full[k].view(torch.uint8)) for k in full if full[k].dim())
    assert max(n for _, _, n in st.reads) <= 1 << 20
    # One part alone: its group read around it (into scratch), the damage in a neighbour found.
    q = m.tensors["layers.1.w"].pieces[2]
    _flip(tmp_path, 1, next(p for p in m.tensors["emb"].pieces if p.file == q.file))
    dest = torch.empty(q.shape)
    with pytest.raises(IntegrityError, match="group of parts"):
        read_pieces(st, "step-000000000001", plan_fill("layers.1.w", m.tensors["layers.1.w"], dest, q.offsets),
                    IOOptions(read_chunk_bytes=1 << 20), step=1)  # fmt: skip
