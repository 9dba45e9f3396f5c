"""Format 2's compact rows built from what each rank wrote, without one :class:`Piece` per part on rank 0.

With per-rank plans every rank knows which tensors are compact rows (``plan.compact_keys``) and writes its part
of them in runs of consecutive rows, one run per shard file. Each rank turns such a file into a
:class:`PartsFile` (the file's ``layout`` line: part, compact-row range, first byte, the parts' crc32c) and sends
that instead of its pieces. Rank 0 assembles the rows from the save's layout and the ranks' lines and checks them
with the reader's own index (:class:`~ckptstore.format.manifest._LayoutIndex`); the manifest's rows are then the
reader's lazy :class:`~ckptstore.format.manifest.SplitPieces`, and encoding writes the lines as they came:
``O(files)`` objects on rank 0, not ``O(parts)``. When the index refuses the lines (a layout too sparse to index,
a rank whose files did not fit), :func:`expand` gives the explicit pieces and the writer decides as it does for
any manifest. No I/O.

Example::

    pf = parts_file("shard-ab-r1-0.safetensors", size, part=1, rows=[0, 1], pieces=[p0, p1])
    ix = layout_index(rows, [pf], files, where="step 7")       # ManifestError when a reader would refuse it
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .crc import crc32c_groups
from .manifest import MAX_MANIFEST_BYTES, Piece, SplitPieces, TensorEntry, _group_size, _LayoutIndex, _new_entry

Row = tuple[tuple[int, ...], int, int]
"""A compact row: ``(global shape, chunk rows, itemsize)``."""


@dataclass(frozen=True)
class PartsFile:
    """A shard file holding, back to back from byte ``start`` to its end, part ``part`` of every compact row in
    ``[first, end)`` that has one, in row order; ``crcs``: the big-endian crc32c of each group of ``k``
    consecutive parts (the writer's choice, :func:`~ckptstore.format.manifest._group_size`), 4 bytes each;
    ``part_crcs``: each part's own when ``k > 1`` (kept for :func:`expand`; 4 bytes a part to rank 0, 55 MB at
    FSDP2 70B / 8192 ranks, the price of a fallback that needs no re-read), else empty."""

    name: str
    part: int
    first: int
    end: int
    start: int
    crcs: bytes
    k: int = 1
    part_crcs: bytes = b""

    def entry(self) -> tuple[str, int, int, int, int, bytes, int]:
        return (self.name, self.part, self.first, self.end, self.start, self.crcs, self.k)


def parts_file(name: str, size: int, part: int, rows: Sequence[int], pieces: Sequence[Piece]) -> PartsFile | None:
    """The :class:`PartsFile` of a written file whose pieces are part ``part`` of the compact rows ``rows``
    (ascending), or None when the pieces are not back to back up to the end of the file."""
    if not pieces or len(rows) != len(pieces) or any(b <= a for a, b in itertools.pairwise(rows)):
        return None
    for a, b in itertools.pairwise(pieces):
        if a.end != b.start:
            return None
    if pieces[-1].end != size:
        return None
    each = [p.crc32c for p in pieces]
    per_part = struct.pack(f">{len(each)}I", *each)
    lens = [p.end - p.start for p in pieces]
    k = _group_size(lens)
    groups = per_part if k < 2 else struct.pack(f">{-(-len(each) // k)}I", *crc32c_groups(each, lens, k))
    if k < 2:  # the line's checksums are the parts' own
        return PartsFile(name, part, rows[0], rows[-1] + 1, pieces[0].start, per_part)
    return PartsFile(name, part, rows[0], rows[-1] + 1, pieces[0].start, groups, k, per_part)


def layout_index(rows: Sequence[Row], files: Sequence[PartsFile], sizes: Mapping[str, int], where: str) -> _LayoutIndex:
    """The reader's index over ``rows`` and the files' lines: raises ``ManifestError`` when a reader would refuse
    them (a part missing or held twice, byte counts that do not match the files, a layout too sparse)."""
    return _LayoutIndex(rows, [f.entry() for f in files], sizes, MAX_MANIFEST_BYTES // 5, where)


def split_entries(ix: _LayoutIndex, rows: Sequence[Row], metas: Sequence[tuple[str, str]]) -> list[TensorEntry]:
    """The manifest rows of the compact tensors (``metas``: their dtype and device, in row order), as a reader
    of the manifest would build them."""
    out = []
    for row, ((shape, _, itemsize), (dtype, device)) in enumerate(zip(rows, metas)):
        out.append(_new_entry(TensorEntry, (dtype, shape, SplitPieces(ix, row, shape, itemsize), device, "raw")))
    return out


def expand(rows: Sequence[Row], files: Sequence[PartsFile]) -> dict[int, list[Piece]]:
    """The explicit pieces of the files' parts, by compact row (the fallback when :func:`layout_index` refuses
    the lines). ``O(rows spanned + parts)``; ignores what does not fit (the writer's checks refuse the result)."""
    out: dict[int, list[Piece]] = {}
    for f in files:
        each = f.part_crcs if f.k > 1 else f.crcs
        pos, k = f.start, 0
        for r in range(f.first, min(f.end, len(rows))):
            shape, c, itemsize = rows[r]
            d0 = shape[0]
            n = -(-d0 // c) if c > 0 else 0
            if f.part >= n or 4 * k + 4 > len(each):
                continue
            nrows = min(c, d0 - f.part * c)
            nb = nrows * itemsize
            for x in shape[1:]:
                nb *= x
            crc = int.from_bytes(each[4 * k : 4 * k + 4], "big")
            zeros = (0,) * (len(shape) - 1)
            out.setdefault(r, []).append(Piece(f.name, pos, pos + nb, crc, (f.part * c, *zeros), (nrows, *shape[1:])))
            pos += nb
            k += 1
    return out
