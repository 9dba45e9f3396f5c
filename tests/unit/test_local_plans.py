"""Per-rank planning (``ckptstore.save.plans``): what a rank plans alone from its own boxes is exactly its part
of the gathered plan; irregular boxes are refused (the save gathers); ``PerRank`` tensors stay with their rank;
the compact plan is reused while the structure holds."""

from __future__ import annotations

import pytest

from ckptstore.options import IOOptions
from ckptstore.plan import LocalSpec, plan_writes
from ckptstore.save.plans import LocalPlans, Structure, agreed

OPTS = IOOptions(chunk_bytes=64 << 10, file_bytes=1 << 20, min_split_bytes=1, threads=4)


def whole(key: str, shape: tuple[int, ...], order: int, sample: int | None = 7) -> LocalSpec:
    return LocalSpec(key, "float32", 4, shape, (0,) * len(shape), shape, order, sample=sample)


def part(key: str, gshape: tuple[int, ...], order: int, rank: int, world: int) -> LocalSpec:
    c = -(-gshape[0] // world)
    rows = max(0, min(c, gshape[0] - rank * c))
    offs = (min(rank * c, gshape[0]), *(0,) * (len(gshape) - 1))
    return LocalSpec(key, "bfloat16", 2, gshape, offs, (rows, *gshape[1:]), order)


def rank_specs(rank: int, world: int) -> list[LocalSpec]:
    out: list[LocalSpec] = []
    for i in range(12):
        out.append(whole(f"ddp/{i}.w", (96, 64), len(out)))  # replicas, some over chunk_bytes (split)
        out.append(part(f"fsdp/{i}.w", (50 + i, 33), len(out), rank, world))  # uneven: trailing ranks hold less
        out.append(part(f"fsdp/{i}.b", (3,), len(out), rank, world))  # fewer rows than ranks: empty parts
    out.append(whole("step", (), len(out)))
    return out


def tree_with_per_rank(rank: int) -> dict:
    leaf = {"t": "tensor", "key": f"rng/~rank{rank}"}
    return {"t": "dict", "v": [{"t": "per_rank", "v": {str(rank): leaf}}]}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_each_rank_plans_exactly_its_part_of_the_gathered_plan(world: int) -> None:
    per_rank = [rank_specs(r, world) for r in range(world)]
    gathered = plan_writes(per_rank, save_id="ab12cd34", options=OPTS)
    structures = []
    for r in range(world):
        mine = LocalPlans().derive(per_rank[r], None, rank=r, world=world)
        assert mine is not None
        structures.append(mine.structure)
        assert LocalPlans().files(mine, OPTS, save_id="ab12cd34", rank=r) == gathered.for_rank(r)
    assert agreed(structures)


def test_irregular_boxes_are_not_derivable_locally() -> None:
    cols = LocalSpec("cols", "float32", 4, (8, 8), (0, 4), (8, 4), 0)  # Shard(1)
    assert LocalPlans().derive([cols], None, rank=1, world=2) is None
    not_mine = part("w", (8, 8), 0, rank=0, world=2)  # rank 0's part claimed by rank 1
    assert LocalPlans().derive([not_mine], None, rank=1, world=2) is None
    hsdp = part("w", (8, 8), 0, rank=0, world=2)  # a 2-way split held on 4 ranks
    assert LocalPlans().derive([hsdp], None, rank=0, world=4) is None


def test_ranks_with_other_structures_or_diverged_replicas_do_not_agree() -> None:
    a = LocalPlans().derive([whole("w", (4,), 0, sample=1)], None, rank=0, world=2)
    b = LocalPlans().derive([whole("w", (4,), 0, sample=2)], None, rank=1, world=2)  # diverged replica
    c = LocalPlans().derive([whole("w", (5,), 0, sample=1)], None, rank=1, world=2)  # another shape
    d = LocalPlans().derive([whole("w", (4,), 0, sample=1)], None, rank=1, world=2)
    assert a is not None and b is not None and c is not None and d is not None
    assert agreed([a.structure, d.structure])
    assert not agreed([a.structure, b.structure])
    assert not agreed([a.structure, c.structure])
    assert not agreed([Structure(None, ""), Structure(None, "")])  # nobody could derive: gather


def test_per_rank_tensors_are_written_by_their_rank_outside_the_shared_layout() -> None:
    world = 3
    plans = []
    for r in range(world):
        own = LocalSpec(f"rng/~rank{r}", "uint8", 1, (100 + r,), (0,), (100 + r,), 5)
        specs = [whole("w", (256, 64), 0), own]
        mine = LocalPlans().derive(specs, tree_with_per_rank(r), rank=r, world=world)
        assert mine is not None and mine.own == (own,)
        assert all(t.key == "w" for t in mine.layout.tensors)  # same layout on every rank
        plans.append((mine.structure, LocalPlans().files(mine, OPTS, save_id="s", rank=r)))
    assert agreed([s for s, _ in plans])
    for r, (_, files) in enumerate(plans):
        items = [it for f in files for it in f.items]
        assert [(it.key, it.nbytes) for it in items if it.key.startswith("rng")] == [(f"rng/~rank{r}", 100 + r)]
    written = sum(it.nbytes for _, files in plans for f in files for it in f.items if it.key == "w")
    assert written == 256 * 64 * 4  # the replica once, over all ranks


def test_the_compact_plan_is_reused_while_the_structure_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptstore.save.plans as mod

    calls = []
    orig = mod.plan_layout
    monkeypatch.setattr(mod, "plan_layout", lambda *a, **k: calls.append(1) or orig(*a, **k))
    plans = LocalPlans()
    specs = rank_specs(1, 4)
    first = plans.files(plans.derive(specs, None, rank=1, world=4), OPTS, save_id="aaaa0000", rank=1)
    again = plans.files(plans.derive(list(specs), None, rank=1, world=4), OPTS, save_id="bbbb1111", rank=1)
    assert len(calls) == 1
    assert [f.items for f in again] == [f.items for f in first]
    assert all(f.name.startswith("shard-bbbb1111-") for f in again)
    plans.files(plans.derive(specs, None, rank=1, world=4), IOOptions(chunk_bytes=1 << 20), save_id="c", rank=1)
    bigger = [*specs, whole("extra", (2,), len(specs))]
    plans.files(plans.derive(bigger, None, rank=1, world=4), OPTS, save_id="d", rank=1)
    assert len(calls) == 3  # other options, then another structure: planned again


def test_other_ranks_send_only_their_per_rank_values_and_rank0_merges_them() -> None:
    import torch

    from ckptstore import PerRank
    from ckptstore.format.state import flatten, merge_per_rank, merge_trees, per_rank_values

    def state(r: int) -> dict:
        return {
            "model": {"w": torch.zeros(3), "meta": {"lr": 0.1, "names": ["a", "b"]}},
            "rng": PerRank(torch.full((2,), float(r))),
            "loader": [PerRank({"pos": torch.tensor(r)}), 7],
        }

    trees = [flatten(state(r), rank=r).tree for r in range(4)]
    sent = [per_rank_values(t) for t in trees[1:]]
    assert merge_per_rank(trees[0], sent) == merge_trees(trees)
    assert all(len(v) == 2 for v in sent)  # the two PerRank nodes, nothing of the rest of the tree
    assert "model" not in repr(sent) and "lr" not in repr(sent)
    assert merge_per_rank(trees[0], []) == trees[0]
