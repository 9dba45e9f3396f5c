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

from ..format.state import per_rank_keys
from ..options import IOOptions
from ..plan import CompactPlan, FilePlan, LocalSpec, SaveLayout, fingerprint, layout_from_local, plan_layout, rank_plan

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


class LocalPlans:
    """Derives this rank's layout and plans its files; keeps the last compact plan for the next save."""

    def __init__(self) -> None:
        self._key: tuple[str, IOOptions] | None = None
        self._plan: CompactPlan | None = None

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
        if self._key != key or self._plan is None:
            self._plan = plan_layout(mine.layout, options)
            self._key = key
        else:
            log.debug("save plan reused (structure %s unchanged)", fp)
        return rank_plan(self._plan, rank, save_id, mine.own)
