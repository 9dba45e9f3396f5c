"""Write planning: a pure function from every rank's tensor boxes and the world size to a write plan.

No I/O, no collectives. Every rank can run it on the same input and get the same plan; in practice rank 0 runs
it and broadcasts the result (or, with :func:`layout_from_local`, every rank derives its own part locally).

Rules (DESIGN §4):

* a box held by several ranks (a replicated tensor under DDP, a replicated DTensor placement) is written once;
* boxes larger than ``chunk_bytes`` are split along dim 0 into ``ceil(bytes / chunk_bytes)`` chunks (never more
  because there are more ranks: the piece count of replicated state does not grow with the world size);
* chunks are assigned largest first to the least-loaded rank that holds them (balance by bytes; one heap per
  holder set, so planning is ``O(pieces · log world)``, never a scan of every holder per chunk);
* a tensor split evenly along dim 0 (FSDP2 / DTensor ``Shard(0)``, ``torch.chunk`` sizes) is written by its
  owners, one part each, without planning anything per part;
* each rank spreads its share over a few shard files (small tensors batched, never a file per tensor): its
  parts of evenly split tensors in runs of consecutive tensors (what the compact manifest rows of format 2
  describe), everything else balanced over the remaining files.

The plan goes through a compact description first (:class:`SaveLayout`: one :class:`TensorLayout` per tensor,
with its placement, never one entry per rank for regular shardings)::

    layout = describe(per_rank_specs)           # or layout_from_local(my_specs, rank, world) on every rank
    cplan = plan_layout(layout, options)        # O(pieces + world log world), on rank 0 (or every rank)
    mine = rank_plan(cplan, rank, save_id)      # this rank's FilePlans, cost ~ what the rank owns
    key = fingerprint(layout)                   # same structure => same key (plan caching)

Example::

    specs = [[LocalSpec("w", "float32", 4, (1024, 1024), (0, 0), (1024, 1024), 0)]] * 2   # DDP, 2 ranks
    plan = plan_writes(specs, save_id="ab12cd34", options=IOOptions(chunk_bytes=1 << 20))
    assert {f.rank for f in plan.files} == {0, 1}
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._gcpause import gc_pause
from .options import IOOptions


@dataclass(frozen=True)
class LocalSpec:
    """One tensor box a rank holds: ``shape`` elements starting at ``offsets`` of a ``global_shape`` tensor."""

    key: str
    dtype: str
    itemsize: int
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    order: int
    """Position in the state (keeps related tensors together and files in a stable order)."""
    encoding: str = "raw"
    device: str = "cpu"
    """Device the tensor lived on at save time (restored there by default)."""
    sample: int | None = None
    """Checksum of (samples of) the box's bytes when it is a whole tensor, so replicas can be compared."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class WriteItem:
    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    nbytes: int
    order: int
    whole: bool
    """True when the item is the entire global tensor (the manifest then omits the box)."""


@dataclass(frozen=True)
class FilePlan:
    name: str
    rank: int
    items: tuple[WriteItem, ...]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass(frozen=True)
class WritePlan:
    files: tuple[FilePlan, ...]
    world_size: int

    def for_rank(self, rank: int) -> list[FilePlan]:
        return [f for f in self.files if f.rank == rank]

    def bytes_per_rank(self) -> list[int]:
        out = [0] * self.world_size
        for f in self.files:
            out[f.rank] += f.nbytes
        return out


# -- the compact description -----------------------------------------------------------------------------------
REPLICATED = "replicated"
"""Placement of a tensor every holder has whole (DDP, ``Replicate()``): ``holders`` lists them."""
SHARD0 = "shard0"
"""Placement of a tensor split along dim 0 into parts of ``chunk`` rows (the last may be shorter; ``torch.chunk``
sizes, what FSDP2 and DTensor ``Shard(0)`` hold): part ``p`` is held by ``owners[p]`` alone."""
BOXES = "boxes"
"""Any other layout: ``boxes`` lists ``(offsets, shape, holders)`` (HSDP, uneven or multi-dim shardings)."""


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of a save and where its bytes live, independent of the world size for regular shardings."""

    key: str
    dtype: str
    itemsize: int
    global_shape: tuple[int, ...]
    order: int
    encoding: str
    device: str
    placement: str
    holders: tuple[int, ...] = ()
    """REPLICATED: the ranks holding the tensor (one interned tuple shared by every such tensor)."""
    chunk: int = 0
    """SHARD0: rows per part."""
    owners: tuple[int, ...] = ()
    """SHARD0: the rank holding each non-empty part (interned)."""
    boxes: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()
    """BOXES: ``(offsets, shape, holders)`` of every non-empty box."""

    @property
    def row_bytes(self) -> int:
        return math.prod(self.global_shape[1:]) * self.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.global_shape) * self.itemsize

    def part_rows(self, p: int) -> int:
        """SHARD0: rows of part ``p`` (0 past the last part)."""
        d0 = self.global_shape[0]
        return max(0, min(self.chunk, d0 - p * self.chunk))


@dataclass(frozen=True)
class SaveLayout:
    world_size: int
    tensors: tuple[TensorLayout, ...]
    """Sorted by ``(order, key)``."""


def shard0_part(global_shape: Sequence[int], offsets: Sequence[int], shape: Sequence[int], parts: int) -> int | None:
    """The part index of the box if it is part ``p`` of the ``torch.chunk(t, parts, dim=0)`` split (None if not;
    -1 for the empty parts past the end that FSDP2 pads with)."""
    if not global_shape or len(offsets) != len(global_shape) or len(shape) != len(global_shape):
        return None
    if tuple(shape[1:]) != tuple(global_shape[1:]) or any(offsets[1:]):
        return None
    d0 = global_shape[0]
    c = -(-d0 // parts) if d0 else 0
    if c == 0:
        return None
    if shape[0] == 0:  # an empty shard: FSDP2's offsets for it are not meaningful
        return -1
    p, rem = divmod(offsets[0], c)
    if rem:
        return None
    return p if shape[0] == max(0, min(c, d0 - p * c)) else None


class _Interner:
    def __init__(self) -> None:
        self.tuples: dict[tuple[int, ...], tuple[int, ...]] = {}

    def __call__(self, t: Sequence[int]) -> tuple[int, ...]:
        t = tuple(t)
        return self.tuples.setdefault(t, t)


def describe(per_rank: Sequence[Sequence[LocalSpec]]) -> SaveLayout:
    """The compact description of what every rank holds (``per_rank[r]``: rank ``r``'s boxes). Linear in the
    input. Raises ``ValueError`` when ranks disagree about a tensor's dtype or global shape."""
    world = len(per_rank)
    if world < 1:
        raise ValueError("plan_writes needs at least one rank")
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    first: dict[str, LocalSpec] = {}
    boxes: dict[str, dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]]] = {}
    for rank, specs in enumerate(per_rank):
        for s in specs:
            m = (s.dtype, s.global_shape)
            got = meta.setdefault(s.key, m)
            if got != m:
                raise ValueError(
                    f"ranks disagree on tensor {s.key!r}: {got} vs {m} (rank {rank}); every rank must "
                    "save the same structure"
                )
            first.setdefault(s.key, s)
            by_box = boxes.setdefault(s.key, {})
            if not s.nbytes and math.prod(s.global_shape) > 0:
                # An empty local shard of a non-empty tensor (FSDP2 pads uneven dims, so trailing ranks may
                # hold nothing): nothing to write, and its offsets may point past the end of the tensor.
                continue
            by_box.setdefault((s.offsets, s.shape), []).append(rank)
    intern = _Interner()
    out = []
    for key, s in first.items():
        bx = boxes[key]
        base = (key, s.dtype, s.itemsize, s.global_shape, s.order, s.encoding, s.device)
        gshape = s.global_shape
        if len(bx) == 1:
            (offs, shape), holders = next(iter(bx.items()))
            if shape == gshape and not any(offs):
                out.append(TensorLayout(*base, REPLICATED, holders=intern(holders)))
                continue
        elif len(bx) > 1 and all(len(h) == 1 for h in bx.values()) and s.encoding == "raw":
            t = _as_shard0(gshape, bx, intern)
            if t is not None:
                out.append(TensorLayout(*base, SHARD0, chunk=t[0], owners=t[1]))
                continue
        if not bx:  # every rank's box of a non-empty tensor is empty: nothing to write (the encoder refuses the
            out.append(TensorLayout(*base, BOXES))  # gap before the commit, as readers would)
            continue
        out.append(TensorLayout(*base, BOXES, boxes=tuple(sorted((o, sh, intern(h)) for (o, sh), h in bx.items()))))
    out.sort(key=lambda t: (t.order, t.key))
    return SaveLayout(world, tuple(out))


def _as_shard0(
    gshape: tuple[int, ...], bx: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]], intern: _Interner
) -> tuple[int, tuple[int, ...]] | None:
    d0 = gshape[0] if gshape else 0
    if not d0:
        return None
    c = 0
    for offs, shape in bx:
        if not offs[0]:
            c = shape[0]
    if not c:
        return None
    nparts = -(-d0 // c)
    if len(bx) != nparts:
        return None
    owners = [-1] * nparts
    for (offs, shape), holders in bx.items():
        if shape[1:] != gshape[1:] or any(offs[1:]):
            return None
        p, rem = divmod(offs[0], c)
        if rem or p >= nparts or shape[0] != min(c, d0 - p * c) or owners[p] != -1:
            return None
        owners[p] = holders[0]
    return c, intern(owners)


def layout_from_local(specs: Sequence[LocalSpec], rank: int, world: int) -> SaveLayout | None:
    """The :class:`SaveLayout` a rank can derive from its own boxes alone, when every tensor is either whole
    (replicated on every rank) or this rank's part of an even dim-0 split over all ``world`` ranks; None when
    some box fits neither (then gather every rank's boxes and :func:`describe` them).

    Every rank computes it in ``O(its tensors)``; the ranks then compare :func:`fingerprint` values (one small
    collective): equal fingerprints mean every rank's box is the one the layout says, so the layout is right."""
    intern = _Interner()
    everyone = intern(range(world))
    by_n: dict[int, tuple[int, ...]] = {world: everyone}  # owners of n parts: ranks 0..n-1, one tuple per n
    out = []
    seen: set[str] = set()
    for s in specs:
        if s.key in seen:
            return None
        seen.add(s.key)
        base = (s.key, s.dtype, s.itemsize, s.global_shape, s.order, s.encoding, s.device)
        if s.shape == s.global_shape and not any(s.offsets):
            out.append(TensorLayout(*base, REPLICATED, holders=everyone))
            continue
        if s.encoding != "raw" or world < 2:
            return None
        p = shard0_part(s.global_shape, s.offsets, s.shape, world)
        d0 = s.global_shape[0]
        c = -(-d0 // world)
        if p is None or (p != rank and p != -1) or (p == -1 and c * rank < d0):
            return None
        n = -(-d0 // c)
        owners = by_n.get(n)
        if owners is None:
            owners = by_n[n] = everyone[:n]
        out.append(TensorLayout(*base, SHARD0, chunk=c, owners=owners))
    out.sort(key=lambda t: (t.order, t.key))
    return SaveLayout(world, tuple(out))


def fingerprint(layout: SaveLayout) -> str:
    """A structural fingerprint of a save's layout (keys, dtypes, shapes, placements, orders, devices): the same
    structure gives the same value, any change a different one (blake2b-128). ``O(tensors + distinct holder
    sets)``: interned holder/owner tuples are hashed once."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"ckptstore-layout-1|{layout.world_size}|".encode())
    memo: dict[int, str] = {}

    def ranks(t: tuple[int, ...]) -> str:
        got = memo.get(id(t))
        if got is None:
            got = memo[id(t)] = hashlib.blake2b(repr(t).encode(), digest_size=8).hexdigest()
        return got

    for t in layout.tensors:
        if t.placement == BOXES:
            extra = repr([(o, s, ranks(hs)) for o, s, hs in t.boxes])
        elif t.placement == SHARD0:
            extra = f"{t.chunk}:{ranks(t.owners)}"
        else:
            extra = ranks(t.holders)
        row = (t.key, t.dtype, t.itemsize, t.global_shape, t.order, t.encoding, t.device, t.placement, extra)
        h.update(repr(row).encode())
        h.update(b"\n")
    return h.hexdigest()


# -- planning ------------------------------------------------------------------------------------------------------
def shard_file_name(save_id: str, rank: int, index: int) -> str:
    # The save id keeps two concurrent writers of one step from clobbering each other's data files.
    return f"shard-{save_id}-r{rank}-{index}.safetensors"


def _split_rows(
    offsets: tuple[int, ...], shape: tuple[int, ...], nbytes: int, chunk_bytes: int, encoding: str = "raw"
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Dim-0 chunks of at most ``chunk_bytes`` (``ceil(nbytes / chunk_bytes)`` of them, equal sizes)."""
    if nbytes <= chunk_bytes or not shape or shape[0] <= 1 or encoding != "raw":
        return [(offsets, shape)]
    rows = shape[0]
    n = min(rows, math.ceil(nbytes / chunk_bytes))
    per = math.ceil(rows / n)
    out = []
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        out.append(((offsets[0] + r0, *offsets[1:]), (r1 - r0, *shape[1:])))
    return out


@dataclass(frozen=True)
class CompactPlan:
    """Who writes what, without one entry per rank for evenly split tensors (their owners write their parts)."""

    layout: SaveLayout
    options: IOOptions
    assigned: dict[int, tuple[WriteItem, ...]]
    """Rank -> the items of replicated / irregular tensors it writes (largest first)."""
    loads: tuple[int, ...]
    """Bytes each rank writes."""
    shard0: tuple[tuple[Any, ...], ...] = ()
    """Evenly split tensors, precomputed for :func:`rank_plan`: ``(key, order, chunk, dim 0, row bytes, itemsize,
    trailing shape, trailing zeros, encoding, parts)`` where ``parts`` is ``None`` when part ``p`` is rank ``p``'s,
    else ``{rank: part}`` (shared by the tensors of one owner list)."""

    def bytes_per_rank(self) -> list[int]:
        return list(self.loads)


def _shard0_loads(layout: SaveLayout, world: int) -> list[int]:
    """Bytes of evenly split tensors each rank owns: ``O(tensors + world)`` when owners are ranks 0..n-1."""
    diff = [0] * (world + 1)
    load = [0] * world
    ident: dict[int, bool] = {}
    for t in layout.tensors:
        if t.placement != SHARD0:
            continue
        n = len(t.owners)
        full = t.chunk * t.row_bytes
        last = t.part_rows(n - 1) * t.row_bytes
        is_ident = ident.get(id(t.owners))
        if is_ident is None:
            is_ident = ident[id(t.owners)] = t.owners == tuple(range(n))
        if is_ident:
            diff[0] += full
            diff[n - 1] -= full
            load[n - 1] += last
        else:
            for p, r in enumerate(t.owners):
                load[r] += full if p < n - 1 else last
    run = 0
    for r in range(world):
        run += diff[r]
        load[r] += run
    return load


def plan_layout(layout: SaveLayout, options: IOOptions) -> CompactPlan:
    """Balance the bytes of replicated and irregular tensors over their holders (largest first onto the
    least-loaded holder, one lazy heap per holder set), on top of what each rank must write of its own parts.
    ``O(pieces · log world + world)``; deterministic."""
    world = layout.world_size
    load = _shard0_loads(layout, world)
    cb = options.chunk_bytes
    items: list[tuple[int, int, str, tuple[int, ...], WriteItem, tuple[int, ...]]] = []
    for t in layout.tensors:
        if t.placement == SHARD0:
            continue
        if t.placement == REPLICATED:
            boxes = (((0,) * len(t.global_shape), t.global_shape, t.holders),)
        else:
            boxes = t.boxes
        for offs, shape, holders in boxes:
            nb = math.prod(shape) * t.itemsize
            for o, sh in _split_rows(offs, shape, nb, cb, t.encoding):
                whole = sh == t.global_shape and not any(o)
                n = math.prod(sh) * t.itemsize
                it = WriteItem(t.key, o, sh, n, t.order, whole)
                items.append((-n, t.order, t.key, o, it, holders))
    items.sort(key=lambda x: x[:4])
    heaps: dict[int, list[tuple[int, int]]] = {}
    assigned: dict[int, list[WriteItem]] = {}
    for _, _, _, _, it, holders in items:
        if len(holders) == 1:
            r = holders[0]
        else:
            hp = heaps.get(id(holders))
            if hp is None:
                hp = heaps[id(holders)] = [(load[r], r) for r in holders]
                heapq.heapify(hp)
            while True:  # lazy: an entry is stale when its rank got load from another holder set meanwhile
                lo, r = hp[0]
                if lo == load[r]:
                    break
                heapq.heapreplace(hp, (load[r], r))
            heapq.heapreplace(hp, (lo + it.nbytes, r))
        load[r] += it.nbytes
        assigned.setdefault(r, []).append(it)
    shard0 = []
    by_owners: dict[int, dict[int, int] | None] = {}
    for t in layout.tensors:
        if t.placement != SHARD0:
            continue
        parts = by_owners.get(id(t.owners), -1)
        if parts == -1:
            ident = t.owners == tuple(range(len(t.owners)))
            parts = by_owners[id(t.owners)] = None if ident else {r: p for p, r in enumerate(t.owners)}
        rest = t.global_shape[1:]
        shard0.append(
            (t.key, t.order, t.chunk, t.global_shape[0], t.row_bytes, t.itemsize, rest, (0,) * len(rest), t.encoding,
             parts, len(t.owners))
        )  # fmt: skip
    return CompactPlan(layout, options, {r: tuple(v) for r, v in assigned.items()}, tuple(load), tuple(shard0))


def rank_plan(plan: CompactPlan, rank: int, save_id: str, extra: Sequence[LocalSpec] = ()) -> list[FilePlan]:
    """The shard files ``rank`` writes, derived from the compact plan alone in ``O(tensors + items of the
    rank)``: its parts of evenly split tensors (in runs of consecutive tensors, one run per file) and the
    replicated / irregular items assigned to it (balanced over the other files). ``extra``: whole tensors only
    this rank holds and writes itself, outside the plan (``PerRank`` values), balanced with the latter."""
    opts = plan.options
    parts: list[WriteItem] = []
    chunks: list[WriteItem] = []
    cb = opts.chunk_bytes
    for key, order, c, d0, rb, itemsize, rest, zeros, enc, owner_parts, n in plan.shard0:
        if owner_parts is None:
            if rank >= n:
                continue
            p = rank
        else:
            p = owner_parts.get(rank, -1)
            if p < 0:
                continue
        rows = min(c, d0 - p * c)
        nb = rows * rb
        offs = (p * c, *zeros)
        shape = (rows, *rest)
        if c * rb <= cb or c <= 1:  # decided by the full part, alike on every rank: a compact row of format 2
            parts.append(WriteItem(key, offs, shape, nb, order, False))
        else:  # parts bigger than chunk_bytes: their chunks are balanced over files like any other item
            split = _split_rows(offs, shape, nb, cb, enc)
            chunks.extend(WriteItem(key, o, sh, math.prod(sh) * itemsize, order, False) for o, sh in split)
    others = list(plan.assigned.get(rank, ()))
    for s in extra:
        nb = s.nbytes
        for o, sh in _split_rows(s.offsets, s.shape, nb, cb, s.encoding):
            whole = sh == s.global_shape and not any(o)
            chunks.append(WriteItem(s.key, o, sh, math.prod(sh) * s.itemsize, s.order, whole))
    if chunks:
        others = sorted(others + chunks, key=lambda i: (-i.nbytes, i.order, i.key, i.offsets))
    total = sum(i.nbytes for i in parts) + sum(i.nbytes for i in others)
    n_items = len(parts) + len(others)
    if not n_items:
        return []
    if total < opts.min_split_bytes:
        n_files = 1
    else:
        n_files = max(math.ceil(total / opts.file_bytes), min(opts.threads, n_items))
    files: list[list[WriteItem]] = []
    # Parts in runs of consecutive tensors (files of format 2's compact rows), sized like every other file.
    if parts:
        pbytes = sum(i.nbytes for i in parts)
        n_parts = max(1, min(len(parts), round(n_files * pbytes / total) if total else 1))
        target = pbytes / n_parts
        run: list[WriteItem] = []
        acc = 0
        for it in parts:  # already in (order, key) order
            if run and acc + it.nbytes / 2 > target * (len(files) + 1) and len(files) < n_parts - 1:
                files.append(run)
                run = []
            run.append(it)
            acc += it.nbytes
        files.append(run)
        n_files = max(0, n_files - len(files))
    if others:
        n_other = max(1, n_files)
        bins: list[list[WriteItem]] = [[] for _ in range(n_other)]
        heap = [(0, b) for b in range(n_other)]  # (fill, bin): the least-filled bin, lowest index on ties
        for it in others:  # already largest first
            fill, b = heap[0]
            heapq.heapreplace(heap, (fill + it.nbytes, b))
            bins[b].append(it)
        for b in bins:
            if b:
                b.sort(key=lambda i: (i.order, i.offsets))
                files.append(b)
    return [FilePlan(shard_file_name(save_id, rank, idx), rank, tuple(f)) for idx, f in enumerate(files)]


def compact_keys(layout: SaveLayout, options: IOOptions) -> list[tuple[str, int, int]]:
    """The tensors :func:`rank_plan` writes as format 2's compact rows, in manifest order: ``(key, chunk rows,
    parts)`` of every evenly split tensor of two parts or more whose parts are not chunk-split. The same on
    every rank (a function of the layout and the options)."""
    out = []
    cb = options.chunk_bytes
    for t in layout.tensors:
        if t.placement == SHARD0 and t.encoding == "raw" and len(t.owners) >= 2:
            if t.chunk * t.row_bytes <= cb or t.chunk <= 1:
                out.append((t.key, t.chunk, len(t.owners)))
    return out


def plan_writes(per_rank: Sequence[Sequence[LocalSpec]], *, save_id: str, options: IOOptions) -> WritePlan:
    """Decide which rank writes which bytes into which shard file.

    ``per_rank[r]`` lists the boxes rank ``r`` holds. Raises ``ValueError`` when ranks disagree about a
    tensor's dtype or global shape. ``describe`` + ``plan_layout`` + ``rank_plan`` for every rank.
    """
    with gc_pause():
        cplan = plan_layout(describe(per_rank), options)
        files: list[FilePlan] = []
        for r in range(cplan.layout.world_size):
            files.extend(rank_plan(cplan, r, save_id))
        return WritePlan(tuple(files), cplan.layout.world_size)


def diverged_replicas(all_specs: Sequence[Sequence[LocalSpec]]) -> dict[str, dict[int, list[int]]]:
    """Replicated boxes whose ranks disagree: ``{key: {sample: [ranks]}}`` for every box that several ranks hold
    with different ``sample`` checksums (boxes without a sample are not compared). Linear in the specs.

    Example::

        a = LocalSpec("w", "float32", 4, (2,), (0,), (2,), 0, sample=1)
        assert diverged_replicas([[a], [replace(a, sample=2)]]) == {"w": {1: [0], 2: [1]}}
    """
    seen: dict[tuple[str, tuple[int, ...], tuple[int, ...]], dict[int, list[int]]] = {}
    for rank, specs in enumerate(all_specs):
        for sp in specs:
            if sp.sample is not None:
                seen.setdefault((sp.key, sp.offsets, sp.shape), {}).setdefault(sp.sample, []).append(rank)
    return {box[0]: by for box, by in seen.items() if len(by) > 1}
