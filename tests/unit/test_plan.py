"""The write planner is a pure function: every rule of DESIGN §4.1 checked without processes."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from ckptstore.options import IOOptions
from ckptstore.plan import LocalSpec, WritePlan, plan_writes

KiB, MiB = 1 << 10, 1 << 20
OPTS = IOOptions()


def spec(key: str, shape: tuple[int, ...], order: int, *, offsets=None, gshape=None, dtype="float32", itemsize=4):
    return LocalSpec(
        key, dtype, itemsize, tuple(gshape or shape), tuple(offsets or (0,) * len(shape)), tuple(shape), order
    )


def ddp_model(layers: int, width: int = 256) -> list[LocalSpec]:
    """What every DDP rank holds: ``layers`` equal Linear layers plus Adam's two moments and step."""
    out: list[LocalSpec] = []
    for i in range(layers):
        for kind in ("model", "exp_avg", "exp_avg_sq"):
            out.append(spec(f"{kind}/{i}.weight", (width, width), len(out)))
            out.append(spec(f"{kind}/{i}.bias", (width,), len(out)))
        out.append(spec(f"step/{i}", (), len(out)))
    return out


def cover(plan: WritePlan) -> Counter[tuple[str, int]]:
    """(key, flat element index) -> how many times the plan writes it (1-D and row-range boxes)."""
    c: Counter[tuple[str, int]] = Counter()
    for f in plan.files:
        for it in f.items:
            rows = it.shape[0] if it.shape else 1
            row = math.prod(it.shape[1:]) if it.shape else 1
            r0 = it.offsets[0] if it.offsets else 0
            for r in range(r0, r0 + rows):
                c[(it.key, r)] += row
    return c


def total_bytes(specs: list[LocalSpec]) -> int:
    return sum(s.nbytes for s in specs)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layers", [16, 48])
def test_ddp_many_equal_layers_balanced_and_written_once(world: int, layers: int) -> None:
    specs = ddp_model(layers)
    plan = plan_writes([specs] * world, save_id="s", options=OPTS)
    per_rank = plan.bytes_per_rank()
    assert sum(per_rank) == total_bytes(specs)  # replicated boxes once: no duplicated bytes
    mean = sum(per_rank) / world
    assert max(abs(b - mean) for b in per_rank) <= 0.10 * mean, per_rank
    keys = Counter(it.key for f in plan.files for it in f.items)
    assert set(keys) == {s.key for s in specs} and set(keys.values()) == {1}


def test_replicated_tensor_written_by_exactly_one_rank() -> None:
    s = [spec("w", (10, 10), 0)]
    plan = plan_writes([s, s, s], save_id="s", options=OPTS)
    items = [(f.rank, it) for f in plan.files for it in f.items]
    assert len(items) == 1 and items[0][1].whole and items[0][1].nbytes == 400


@pytest.mark.parametrize("world", [1, 2, 3, 4, 64])
def test_big_tensor_chunked_along_dim0_across_ranks(world: int) -> None:
    opts = IOOptions(chunk_bytes=1 * MiB)
    s = [spec("emb", (1000, 1024), 0)]  # 4000 KiB -> 4 chunks, whatever the world size
    plan = plan_writes([s] * world, save_id="s", options=opts)
    items = [it for f in plan.files for it in f.items]
    assert all(not it.whole and it.shape[1:] == (1024,) for it in items)
    assert len(items) == 4 and all(it.nbytes <= opts.chunk_bytes for it in items)
    c = cover(plan)
    assert sorted(r for _, r in c) == list(range(1000)) and set(c.values()) == {1024}  # every row once
    assert {f.rank for f in plan.files} == set(range(min(world, 4)))
    per_rank = plan.bytes_per_rank()
    assert max(per_rank) - min(per_rank) <= 1024 * 4 * math.ceil(1000 / len(items))  # at most one chunk apart


def test_small_tensor_and_row_vectors_not_chunked() -> None:
    opts = IOOptions(chunk_bytes=1 * KiB)
    specs = [spec("scalar", (), 0), spec("row", (1, 4096), 1), spec("small", (16,), 2)]
    plan = plan_writes([specs, specs], save_id="s", options=opts)
    assert all(it.whole for f in plan.files for it in f.items)


def test_dtensor_like_shards_written_by_their_owners() -> None:
    # A (100, 8) tensor row-sharded over 4 ranks (FSDP2-style, 25 rows each) + a replicated bias.
    world = 4
    per_rank = [
        [
            spec("w", (25, 8), 0, offsets=(25 * r, 0), gshape=(100, 8)),
            spec("b", (8,), 1),
        ]
        for r in range(world)
    ]
    plan = plan_writes(per_rank, save_id="s", options=OPTS)
    for f in plan.files:
        for it in f.items:
            if it.key == "w":
                assert it.offsets == (25 * f.rank, 0) and it.shape == (25, 8) and not it.whole
    assert sum(1 for f in plan.files for it in f.items if it.key == "b") == 1
    assert sum(plan.bytes_per_rank()) == 100 * 8 * 4 + 8 * 4


def test_hsdp_like_boxes_replicated_across_one_mesh_dim_written_once() -> None:
    # 2x2 mesh, [Replicate, Shard(0)]: ranks 0 and 2 hold rows 0-4, ranks 1 and 3 rows 5-9.
    per_rank = [[spec("w", (5, 6), 0, offsets=(5 * (r % 2), 0), gshape=(10, 6))] for r in range(4)]
    plan = plan_writes(per_rank, save_id="s", options=OPTS)
    items = [(f.rank, it.offsets) for f in plan.files for it in f.items]
    assert sorted(o for _, o in items) == [(0, 0), (5, 0)]
    assert len({r for r, _ in items}) == 2  # the two boxes go to different ranks (balance)
    for r, o in items:
        assert r % 2 == o[0] // 5  # only a holder writes a box


def test_empty_local_shards_skipped_but_empty_tensors_kept() -> None:
    # A 3-row tensor over 4 ranks: rank 3's shard is empty (offset past the end, as FSDP2 pads).
    per_rank = [[spec("head", (1, 4), 0, offsets=(r, 0), gshape=(3, 4))] for r in range(3)]
    per_rank.append([spec("head", (0, 4), 0, offsets=(3, 0), gshape=(3, 4))])
    for p in per_rank:
        p.append(spec("nothing", (0, 3), 1))
    plan = plan_writes(per_rank, save_id="s", options=OPTS)
    heads = sorted((f.rank, it.offsets) for f in plan.files for it in f.items if it.key == "head")
    assert heads == [(0, (0, 0)), (1, (1, 0)), (2, (2, 0))]
    assert [it.whole for f in plan.files for it in f.items if it.key == "nothing"] == [True]


def test_per_rank_keys_written_by_their_rank() -> None:
    per_rank = [
        [spec("w", (64, 64), 0), spec(f"rng/~rank{r}", (5056,), 1, dtype="uint8", itemsize=1)] for r in range(3)
    ]
    plan = plan_writes(per_rank, save_id="s", options=OPTS)
    for f in plan.files:
        for it in f.items:
            if it.key.startswith("rng/"):
                assert it.key == f"rng/~rank{f.rank}"


def test_deterministic_and_independent_of_input_dict_order() -> None:
    specs = [*ddp_model(10), spec("big", (4096, 512), 999)]
    opts = IOOptions(chunk_bytes=1 * MiB)
    a = plan_writes([specs] * 4, save_id="abc", options=opts)
    b = plan_writes([list(specs) for _ in range(4)], save_id="abc", options=opts)
    assert a == b
    shuffled = list(specs)
    random.Random(0).shuffle(shuffled)
    c = plan_writes([shuffled] * 4, save_id="abc", options=opts)
    assert {(f.name, f.rank, frozenset(f.items)) for f in a.files} == {
        (f.name, f.rank, frozenset(f.items)) for f in c.files
    }


def test_shard_files_are_per_rank_and_named_by_save_id() -> None:
    specs = ddp_model(8)
    plan = plan_writes([specs] * 2, save_id="deadbeef", options=OPTS)
    for f in plan.files:
        assert f.name.startswith(f"shard-deadbeef-r{f.rank}-") and f.name.endswith(".safetensors")
    assert len({f.name for f in plan.files}) == len(plan.files)
    # Small saves stay one file per rank (no file per tensor).
    assert Counter(f.rank for f in plan.files) == {0: 1, 1: 1}


def test_large_rank_share_spread_over_several_files() -> None:
    opts = IOOptions(file_bytes=64 * MiB, min_split_bytes=64 * MiB, threads=4)
    specs = [spec(f"w{i}", (2048, 2048), i) for i in range(32)]  # 32 x 16 MiB
    plan = plan_writes([specs] * 2, save_id="s", options=opts)
    for r in (0, 1):
        files = plan.for_rank(r)
        assert len(files) >= 4 and all(f.nbytes <= 64 * MiB for f in files)


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (spec("w", (4, 4), 0, dtype="float16", itemsize=2), "float16"),
        (spec("w", (4, 5), 0), "(4, 5)"),
    ],
)
def test_ranks_disagreeing_on_a_tensor_raise_value_error(other: LocalSpec, what: str) -> None:
    with pytest.raises(ValueError, match="disagree") as ei:
        plan_writes([[spec("w", (4, 4), 0)], [other]], save_id="s", options=OPTS)
    assert what in str(ei.value) and "rank 1" in str(ei.value)


def test_no_ranks_is_an_error() -> None:
    with pytest.raises(ValueError):
        plan_writes([], save_id="s", options=OPTS)


def test_diverged_replicas_groups_ranks_by_fingerprint() -> None:
    from dataclasses import replace

    from ckptstore.plan import diverged_replicas

    a = LocalSpec("w", "float32", 4, (2,), (0,), (2,), 0, sample=1)
    b = LocalSpec("b", "float32", 4, (2,), (0,), (2,), 1, sample=7)
    assert diverged_replicas([[a, b], [a, b], [a, b]]) == {}
    assert diverged_replicas([[a, b], [replace(a, sample=2), b], [a, b]]) == {"w": {1: [0, 2], 2: [1]}}
    shard = replace(a, offsets=(1,), shape=(1,), sample=None)  # shards carry no fingerprint: never compared
    assert diverged_replicas([[shard], [shard]]) == {}
