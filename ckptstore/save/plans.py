"""Per-rank write plans: each rank plans its own part of a save, from its own boxes, without a gather.

A rank derives the save's compact layout from what it holds (:func:`ckptstore.plan.layout_from_local`: DDP
replicas, FSDP2 / DTensor ``Shard(0)`` parts) and sends rank 0 only its fingerprint and a digest of its replicas'
samples (:class:`Structure`, ~70 bytes) in the first collective of the save. When every rank sent the same pair,
every rank holds the same layout and the same replica values, and plans its own files (``plan_layout`` +
``rank_plan``): nothing of the plan is gathered or broadcast. Otherwise (an irregular sharding such as HSDP, ranks
that disagree, diverged replicas, a rank that could not prepare) the save falls back to gathering every rank's
boxes on rank 0, which also names what disagrees.

``PerRank`` values are outside the shared layout: each rank writes its own (they are not replicas; their shapes
may differ per rank) and reports their specs with its written files.

The compact plan of the last save is cached under its fingerprint and the options: a save with the structure of
the previous one (the common case) skips planning too.

Example::

    plans = LocalPlans()
    mine = plans.derive(job.specs, job.tree, rank=r, world=w)       # None: fall back to the gather
    files = plans.files(mine, options, save_id="ab12cd34", rank=r)  # after every rank agreed
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..format.compact import PartsFile, parts_file
from ..format.state import per_rank_keys
from ..io import WrittenFile
from ..options import IOOptions
from ..plan import (
    CompactPlan,
    FilePlan,
    LocalSpec,
    SaveLayout,
    compact_keys,
    fingerprint,
    layout_from_local,
    plan_layout,
    rank_plan,
)

log = logging.getLogger("ckptstore")


@dataclass(frozen=True)
class Structure:
    """What a rank tells rank 0 about its state at the start of a save."""

    fingerprint: str | None
    """Of the layout it derived from its own boxes (None: it could not, or its state could not be prepared)."""
    replicas: str
    """Digest of the samples of the tensors it holds whole (equal on every rank iff the replicas agree)."""


@dataclass(frozen=True)
class LocalLayout:
    """A rank's view of the save, derived from its own boxes."""

    layout: SaveLayout
    structure: Structure
    own: tuple[LocalSpec, ...]
    """Its ``PerRank`` tensors: written by this rank alone, outside the shared layout."""


def agreed(structures: Sequence[Structure]) -> bool:
    """Rank 0: whether every rank derived the same layout and holds the same replicas (then each plans alone)."""
    first = structures[0]
    return first.fingerprint is not None and all(s == first for s in structures)


@dataclass(frozen=True)
class CompactRows:
    """The save's format-2 compact rows (``plan.compact_keys``), alike on every rank."""

    keys: tuple[tuple[str, int, int], ...]
    """``(key, chunk rows, parts)`` in manifest order."""
    index: dict[str, int]
    """Key -> its row among the compact rows."""

    @classmethod
    def of(cls, keys: Sequence[tuple[str, int, int]]) -> CompactRows:
        return cls(tuple(keys), {k: i for i, (k, _, _) in enumerate(keys)})

    def parts_files(
        self, files: Sequence[FilePlan], written: Sequence[WrittenFile]
    ) -> tuple[list[WrittenFile], list[PartsFile]]:
        """This rank's written files with the files of compact parts as :class:`PartsFile` lines (their
        ``WrittenFile`` keeps only name and size), so rank 0 gets ``O(files)`` objects, not a piece per part."""
        out_w: list[WrittenFile] = []
        out_p: list[PartsFile] = []
        for fp, wf in zip(files, written):
            pf = self._parts_file(fp, wf)
            if pf is None:
                out_w.append(wf)
            else:
                out_w.append(WrittenFile(wf.name, wf.size, ()))
                out_p.append(pf)
        return out_w, out_p

    def _parts_file(self, fp: FilePlan, wf: WrittenFile) -> PartsFile | None:
        if not fp.items or len(wf.pieces) != len(fp.items):
            return None
        rows = []
        part = -1
        for it in fp.items:
            row = self.index.get(it.key)
            if row is None or it.whole or not it.offsets:
                return None
            _, chunk, _ = self.keys[row]
            p, rem = divmod(it.offsets[0], chunk)
            if rem or (part >= 0 and p != part):
                return None
            part = p
            rows.append(row)
        have = set(rows)
        # The line covers every compact row in its range that has this part: none may be elsewhere.
        if any(self.keys[j][2] > part and j not in have for j in range(rows[0], rows[-1] + 1)):
            return None
        return parts_file(wf.name, wf.size, part, rows, [p for _, p in wf.pieces])


class LocalPlans:
    """Derives this rank's layout and plans its files; keeps the last compact plan for the next save."""

    def __init__(self) -> None:
        self._key: tuple[str, IOOptions] | None = None
        self._plan: CompactPlan | None = None
        self._rows: CompactRows | None = None

    def derive(self, specs: Sequence[LocalSpec], tree: Any, *, rank: int, world: int) -> LocalLayout | None:
        """This rank's :class:`LocalLayout`, or None when its boxes do not fit a locally derivable layout."""
        own_keys = per_rank_keys(tree) if tree is not None else set()
        shared = [s for s in specs if s.key not in own_keys]
        own = tuple(s for s in specs if s.key in own_keys)
        layout = layout_from_local(shared, rank, world)
        if layout is None:
            return None
        h = hashlib.blake2b(digest_size=16)
        for s in shared:
            if s.sample is not None:
                h.update(f"{s.key}\0{s.sample}\n".encode())
        return LocalLayout(layout, Structure(fingerprint(layout), h.hexdigest()), own)

    def files(self, mine: LocalLayout, options: IOOptions, *, save_id: str, rank: int) -> list[FilePlan]:
        """The shard files this rank writes (its parts, its share of the replicas, its ``PerRank`` tensors)."""
        fp = mine.structure.fingerprint
        assert fp is not None
        key = (fp, options)
        if self._key != key or self._plan is None or self._rows is None:
            self._plan = plan_layout(mine.layout, options)
            self._rows = CompactRows.of(compact_keys(mine.layout, options))
            self._key = key
        else:
            log.debug("save plan reused (structure %s unchanged)", fp)
        return rank_plan(self._plan, rank, save_id, mine.own)

    @property
    def rows(self) -> CompactRows:
        """The compact rows of the last plan made by :meth:`files`."""
        assert self._rows is not None
        return self._rows
