"""Write planning: a pure function from every rank's tensor boxes and the world size to a write plan.

No I/O, no collectives. Every rank can run it on the same gathered input and get the same plan; in practice
rank 0 runs it and broadcasts the result.

Rules (DESIGN §4):

* a box held by several ranks (a replicated tensor under DDP, a replicated DTensor placement) is written once;
* boxes larger than ``chunk_bytes`` are split along dim 0 into chunks that may go to different ranks/files;
* chunks are assigned largest first to the least-loaded rank that holds them (balance by bytes);
* each rank spreads its share over a few shard files (small tensors batched, never a file per tensor).

Example::

    specs = [[LocalSpec("w", "float32", 4, (1024, 1024), (0, 0), (1024, 1024), 0)]] * 2   # DDP, 2 ranks
    plan = plan_writes(specs, save_id="ab12cd34", options=IOOptions(chunk_bytes=1 << 20))
    assert {f.rank for f in plan.files} == {0, 1}
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def shard_file_name(save_id: str, rank: int, index: int) -> str:
    # The save id keeps two concurrent writers of one step from clobbering each other's data files.
    return f"shard-{save_id}-r{rank}-{index}.safetensors"


def _split_rows(spec: LocalSpec, chunk_bytes: int, holders: int = 1) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    if spec.nbytes <= chunk_bytes or not spec.shape or spec.shape[0] <= 1 or spec.encoding != "raw":
        return [(spec.offsets, spec.shape)]
    rows = spec.shape[0]
    n = math.ceil(spec.nbytes / chunk_bytes)
    if holders > 1:
        # A multiple of the holder count, so the chunks of one big replicated tensor spread evenly
        # (a 100 MiB tensor at 4 ranks: 4 x 25 MiB rather than 2 x 50 MiB and two idle ranks).
        n = math.ceil(n / holders) * holders
    n = min(rows, n)
    per = math.ceil(rows / n)
    out = []
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        out.append(((spec.offsets[0] + r0, *spec.offsets[1:]), (r1 - r0, *spec.shape[1:])))
    return out


def plan_writes(per_rank: Sequence[Sequence[LocalSpec]], *, save_id: str, options: IOOptions) -> WritePlan:
    """Decide which rank writes which bytes into which shard file.

    ``per_rank[r]`` lists the boxes rank ``r`` holds. Raises ``ValueError`` when ranks disagree about a
    tensor's dtype or global shape.
    """
    world = len(per_rank)
    if world < 1:
        raise ValueError("plan_writes needs at least one rank")
    # Merge identical boxes held by several ranks.
    holders: dict[tuple[str, tuple[int, ...], tuple[int, ...]], list[int]] = {}
    first: dict[tuple[str, tuple[int, ...], tuple[int, ...]], LocalSpec] = {}
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    for rank, specs in enumerate(per_rank):
        for s in specs:
            m = (s.dtype, s.global_shape)
            if meta.setdefault(s.key, m) != m:
                raise ValueError(
                    f"ranks disagree on tensor {s.key!r}: {meta[s.key]} vs {m} (rank {rank}); every rank must "
                    "save the same structure"
                )
            if not s.nbytes and math.prod(s.global_shape) > 0:
                # An empty local shard of a non-empty tensor (FSDP2 pads uneven dims, so trailing ranks may
                # hold nothing): nothing to write, and its offsets may point past the end of the tensor.
                continue
            box = (s.key, s.offsets, s.shape)
            holders.setdefault(box, []).append(rank)
            first.setdefault(box, s)

    items: list[tuple[WriteItem, list[int]]] = []
    for box, spec in first.items():
        for offs, shape in _split_rows(spec, options.chunk_bytes, len(holders[box])):
            whole = shape == spec.global_shape and not any(offs)
            it = WriteItem(spec.key, offs, shape, math.prod(shape) * spec.itemsize, spec.order, whole)
            items.append((it, holders[box]))

    # Largest first onto the least-loaded holder: the classic LPT heuristic, deterministic on ties.
    load = [0] * world
    by_rank: list[list[WriteItem]] = [[] for _ in range(world)]
    items.sort(key=lambda x: (-x[0].nbytes, x[0].order, x[0].key, x[0].offsets))
    for it, ranks in items:
        r = ranks[0] if len(ranks) == 1 else min(ranks, key=lambda r: (load[r], r))
        load[r] += it.nbytes
        by_rank[r].append(it)

    files: list[FilePlan] = []
    for rank, its in enumerate(by_rank):
        if not its:
            continue
        total = sum(i.nbytes for i in its)
        if total < options.min_split_bytes:
            n_files = 1
        else:
            n_files = max(math.ceil(total / options.file_bytes), min(options.threads, len(its)))
        bins: list[list[WriteItem]] = [[] for _ in range(n_files)]
        heap = [(0, b) for b in range(n_files)]  # (fill, bin): the least-filled bin, lowest index on ties
        for it in its:  # already largest first
            fill, b = heap[0]
            heapq.heapreplace(heap, (fill + it.nbytes, b))
            bins[b].append(it)
        for idx, b in enumerate(x for x in bins if x):
            b.sort(key=lambda i: (i.order, i.offsets))
            files.append(FilePlan(shard_file_name(save_id, rank, idx), rank, tuple(b)))
    return WritePlan(tuple(files), world)
