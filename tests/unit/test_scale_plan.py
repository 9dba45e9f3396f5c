"""Linear planning (issue #16): piece counts independent of the world size, one heap per holder set, the compact
layout, per-rank plans derived from it, layouts derived locally, structural fingerprints."""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import replace

import pytest

from ckptstore.options import IOOptions
from ckptstore.plan import (
    REPLICATED,
    SHARD0,
    LocalSpec,
    describe,
    fingerprint,
    layout_from_local,
    plan_layout,
    plan_writes,
    rank_plan,
)

MiB = 1 << 20


def spec(key, shape, order, *, offsets=None, gshape=None, dtype="float32", itemsize=4) -> LocalSpec:
    return LocalSpec(
        key, dtype, itemsize, tuple(gshape or shape), tuple(offsets or (0,) * len(shape)), tuple(shape), order
    )


def ddp(layers: int, width: int = 1024) -> list[LocalSpec]:
    out: list[LocalSpec] = []
    for i in range(layers):
        for kind in ("model", "exp_avg", "exp_avg_sq"):
            out.append(spec(f"{kind}/{i}.w", (4 * width, width), len(out)))
            out.append(spec(f"{kind}/{i}.b", (width,), len(out)))
    return out


def fsdp(world: int, shapes: list[tuple[int, ...]]) -> list[list[LocalSpec]]:
    per_rank = []
    for r in range(world):
        sp = []
        for i, gs in enumerate(shapes):
            c = -(-gs[0] // world)
            lo = min(r * c, gs[0])
            rows = max(0, min(c, gs[0] - r * c))
            sp.append(spec(f"t{i}", (rows, *gs[1:]), i, offsets=(lo, *(0,) * (len(gs) - 1)), gshape=gs))
        sp.append(spec("step", (), len(shapes)))
        per_rank.append(sp)
    return per_rank


def items(plan):
    return [it for f in plan.files for it in f.items]


def test_replicated_piece_count_does_not_grow_with_the_world_size() -> None:
    opts = IOOptions(chunk_bytes=4 * MiB)
    specs = ddp(4)  # 16 MiB weights -> 4 chunks each, whatever the world size
    counts = {w: len(items(plan_writes([specs] * w, save_id="s", options=opts))) for w in (2, 8, 64, 256)}
    assert len(set(counts.values())) == 1, counts
    assert counts[2] == 4 * 3 * (4 + 1)


def test_ddp_planning_at_thousands_of_ranks_is_fast() -> None:
    # Old planner: every 256 MiB tensor split into >= 2048 chunks, each scanning 2048 holders (minutes).
    specs = [spec(f"w{i}", (16384, 4096), i) for i in range(40)]
    t0 = time.perf_counter()
    plan = plan_writes([specs] * 2048, save_id="s", options=IOOptions())
    dt = time.perf_counter() - t0
    assert dt < 10, dt
    assert sum(plan.bytes_per_rank()) == sum(s.nbytes for s in specs)
    assert len(items(plan)) == 40 * 4


def _reference_lpt(per_rank, opts):
    """The classic LPT by brute force (min over the holders per item): what the heaps must reproduce."""
    holders: dict = {}
    first: dict = {}
    for r, specs in enumerate(per_rank):
        for s in specs:
            holders.setdefault((s.key, s.offsets, s.shape), []).append(r)
            first.setdefault((s.key, s.offsets, s.shape), s)
    load = [0] * len(per_rank)
    out = {}
    for box in sorted(first, key=lambda b: (-first[b].nbytes, first[b].order, b[0], b[1])):
        r = min(holders[box], key=lambda r: (load[r], r))
        load[r] += first[box].nbytes
        out[box] = r
    return out


@pytest.mark.parametrize("seed", range(5))
def test_heaps_choose_exactly_what_brute_force_lpt_chooses(seed: int) -> None:
    rng = random.Random(seed)
    world = 12
    groups = [tuple(range(world)), tuple(range(0, world, 2)), tuple(range(1, world, 2)), (3, 4, 5), (7,)]
    boxes = []
    for i in range(60):
        g = rng.choice(groups)
        boxes.append((spec(f"k{i}", (rng.randint(1, 50), 8), i), g))
    per_rank = [[s for s, g in boxes if r in g] for r in range(world)]
    plan = plan_writes(per_rank, save_id="s", options=IOOptions())
    got = {(it.key, it.offsets, it.shape): f.rank for f in plan.files for it in f.items}
    assert got == _reference_lpt(per_rank, IOOptions())


def test_fsdp_layout_is_one_row_per_tensor_and_rank_plans_match_the_full_plan() -> None:
    world = 16
    shapes = [(100, 8), (16, 4), (3, 5), (4096,), (17,)]
    per_rank = fsdp(world, shapes)
    lay = describe(per_rank)
    kinds = {t.key: t.placement for t in lay.tensors}
    assert kinds == {**{f"t{i}": SHARD0 for i in range(len(shapes))}, "step": REPLICATED}
    assert len({id(t.owners) for t in lay.tensors if t.placement == SHARD0}) <= len(shapes)  # owners interned
    opts = IOOptions()
    cplan = plan_layout(lay, opts)
    full = plan_writes(per_rank, save_id="ab", options=opts)
    for r in range(world):
        assert rank_plan(cplan, r, "ab") == full.for_rank(r)
        for f in full.for_rank(r):
            for it in f.items:
                if it.key != "step":
                    c = -(-dict(zip([f"t{i}" for i in range(len(shapes))], shapes))[it.key][0] // world)
                    assert it.offsets[0] == r * c  # owners write their own parts
    assert sum(full.bytes_per_rank()) == sum(math.prod(s) * 4 for s in shapes) + 4
    # Every rank derives the same layout from its own boxes: same fingerprint as the gathered one.
    fps = {fingerprint(layout_from_local(per_rank[r], r, world)) for r in range(world)}
    assert fps == {fingerprint(lay)}


def test_layout_from_local_refuses_what_it_cannot_prove() -> None:
    per_rank = fsdp(4, [(10, 2)])
    assert layout_from_local(per_rank[1], 1, 4) is not None
    uneven = replace(per_rank[1][0], offsets=(2, 0), shape=(3, 2))  # not the torch.chunk part of rank 1
    assert layout_from_local([uneven], 1, 4) is None
    assert layout_from_local(per_rank[1], 2, 4) is None  # rank 1's part claimed by rank 2


def test_fingerprint_same_structure_same_value_any_change_differs() -> None:
    per_rank = fsdp(8, [(64, 4), (9,)])
    a = fingerprint(describe(per_rank))
    assert a == fingerprint(describe([list(x) for x in fsdp(8, [(64, 4), (9,)])]))
    changed = [
        fsdp(8, [(64, 5), (9,)]),
        fsdp(8, [(64, 4), (10,)]),
        [[replace(s, dtype="bfloat16", itemsize=2) if s.key == "t0" else s for s in r] for r in per_rank],
        [[replace(s, key="u0") if s.key == "t0" else s for s in r] for r in per_rank],
        [[replace(s, device="cuda:0") if s.key == "t1" else s for s in r] for r in per_rank],
        fsdp(4, [(64, 4), (9,)]),
    ]
    fps = {fingerprint(describe(c)) for c in changed}
    assert a not in fps and len(fps) == len(changed)


def test_rank_plan_cost_follows_what_the_rank_owns() -> None:
    # DDP at 4096 ranks with 64 tensors: a rank's plan lists only its own items (most ranks: none).
    specs = ddp(16, width=256)
    cplan = plan_layout(describe([specs] * 4096), IOOptions())
    sizes = [sum(len(f.items) for f in rank_plan(cplan, r, "s")) for r in range(4096)]
    assert sum(sizes) == len(specs) and max(sizes) <= 2


def test_heap_balance_for_one_big_replicated_set() -> None:
    specs = [spec(f"w{i}", (256, 256), i) for i in range(1000)]
    plan = plan_writes([specs] * 100, save_id="s", options=IOOptions())
    loads = plan.bytes_per_rank()
    assert max(loads) - min(loads) <= 256 * 256 * 4
    ref = [0] * 100
    heap = [(0, r) for r in range(100)]
    for s in specs:
        lo, r = heapq.heappop(heap)
        ref[r] += s.nbytes
        heapq.heappush(heap, (lo + s.nbytes, r))
    assert sorted(loads) == sorted(ref)
