"""ElasticSampler: the global cursor, re-partitioning at another world size, exactly-once, hostile state dicts.

Most tests drive real ElasticSampler objects (one per simulated rank) in lockstep: at every step each rank that
still has a batch consumes it and calls ``advance``; a rank that ran out skips the step (as under DDP's
``join()``). A "preemption" takes the state dicts at a step boundary, and a new set of samplers at another
world size loads rank 0's copy (the one a replicated ``mgr.save`` keeps) and carries on. The real multi-process
version with a CheckpointManager is tests/distributed/test_elastic.py.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from ckptstore import CheckpointManager
from ckptstore.elastic import ElasticSampler, global_cursor
from ckptstore.errors import CheckpointError, ConfigError, StateMismatchError


def perm_of(n: int, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def chunks(xs: list[int], b: int) -> list[list[int]]:
    return [xs[i : i + b] for i in range(0, len(xs), b)]


class Leg:
    """One launch: ``world`` samplers in lockstep until ``steps`` steps were taken (None: to the end of
    ``epochs``). ``seen`` holds (epoch, id) in consumption order; ``states`` every rank's state_dict at the stop;
    ``equal_steps`` whether every rank took the same number of steps in the epoch at the stop."""

    def __init__(
        self,
        n: int,
        world: int,
        batch: int,
        steps: int | None,
        state: dict[str, Any] | None,
        *,
        epochs: int = 1,
        **kw: Any,
    ) -> None:
        self.samplers = [ElasticSampler(n, num_replicas=world, rank=r, **kw) for r in range(world)]
        if state is not None:
            for s in self.samplers:
                s.load_state_dict(state)
        self.seen: list[tuple[int, int]] = []
        self.equal_steps = True
        done = 0
        epoch = self.samplers[0].epoch
        if steps == 0:
            self._stop()
            return
        while epoch < epochs:
            for s in self.samplers:
                s.set_epoch(epoch)
            batches = [chunks(list(s), batch) for s in self.samplers]
            for i in range(max((len(b) for b in batches), default=0)):
                for r, s in enumerate(self.samplers):
                    if i < len(batches[r]):
                        self.seen += [(epoch, x) for x in batches[r][i]]
                        s.advance(len(batches[r][i]))
                done += 1
                if done == steps:
                    self.equal_steps = all(len(b) >= i + 1 for b in batches)
                    self._stop()
                    return
            epoch += 1
            self.equal_steps = len({len(b) for b in batches}) <= 1
        self._stop()

    def _stop(self) -> None:
        self.states = [s.state_dict() for s in self.samplers]
        self.exhausted = [s.consumed_this_pass >= len(s) for s in self.samplers]


def run_chain(n: int, legs: list[tuple[int, int, int | None]], *, epochs: int = 1, **kw: Any) -> list[Leg]:
    out: list[Leg] = []
    state = None
    for world, batch, steps in legs:
        leg = Leg(n, world, batch, steps, state, epochs=epochs, **kw)
        out.append(leg)
        state = leg.states[0]  # what a replicated save keeps
    return out


def consumed_by_epoch(legs: list[Leg]) -> dict[int, list[int]]:
    per: dict[int, list[int]] = {}
    for leg in legs:
        for e, x in leg.seen:
            per.setdefault(e, []).append(x)
    return per


# -- order and DistributedSampler compatibility ------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "drop_last"), [(24, False), (24, True), (23, True), (0, False), (3, True)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_same_order_as_distributed_sampler_when_it_needs_no_padding(
    world: int, n: int, drop_last: bool, shuffle: bool
) -> None:
    for epoch in (0, 3):
        for r in range(world):
            ours = ElasticSampler(n, num_replicas=world, rank=r, seed=7, shuffle=shuffle, drop_last=drop_last)
            theirs = DistributedSampler(
                range(n), num_replicas=world, rank=r, seed=7, shuffle=shuffle, drop_last=drop_last
            )
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_uneven_tail_is_not_padded() -> None:
    per_rank = [list(ElasticSampler(10, num_replicas=4, rank=r, seed=1)) for r in range(4)]
    assert [len(p) for p in per_rank] == [3, 3, 2, 2]
    assert sorted(itertools.chain(*per_rank)) == list(range(10))


def test_order_is_deterministic_per_seed_and_epoch() -> None:
    a = ElasticSampler(50, num_replicas=1, rank=0, seed=3)
    b = ElasticSampler(range(50), num_replicas=1, rank=0, seed=3)
    assert list(a) == list(b) == perm_of(50, 3, 0)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) == perm_of(50, 3, 1) != perm_of(50, 3, 0)
    assert list(ElasticSampler(50, num_replicas=1, rank=0, seed=4)) != perm_of(50, 3, 0)
    assert list(ElasticSampler(50, num_replicas=1, rank=0, shuffle=False)) == list(range(50))


# -- the cursor and re-partitioning ------------------------------------------------------------------------------
def _check_exactly_once(n: int, legs: list[Leg], perm: list[int], drop_last: bool, last_world: int) -> None:
    seen = consumed_by_epoch(legs).get(0, [])
    assert len(seen) == len(set(seen)), f"a sample was consumed twice: {Counter(seen).most_common(3)}"
    if not drop_last:
        assert sorted(seen) == list(range(n))
    else:
        # Only the tail of the pass that reached the end of the epoch is dropped: fewer than its world size.
        assert set(seen) == set(perm[: len(seen)])
        assert n - len(seen) < last_world


def test_repartition_at_every_cut_exactly_once() -> None:
    """Two legs, every (N, W_before, W_after, B, cut step, drop_last): each sample once."""
    cases = 0
    for n, w1, w2, b, drop_last in itertools.product(
        (0, 1, 5, 7, 13, 16), (1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3), (False, True)
    ):
        perm = perm_of(n)
        kw = {"drop_last": drop_last, "seed": 0}
        full = Leg(n, w1, b, None, None, **kw)
        max_steps = math.ceil(math.ceil(n / w1) / b) + 1
        for cut in range(max_steps + 1):
            first = Leg(n, w1, b, cut, None, **kw)
            second = Leg(n, w2, b, None, first.states[0], **kw)
            ended_first = first.states[0]["consumed"] == n
            _check_exactly_once(n, [first, second], perm, drop_last, w1 if ended_first else w2)
            # The cursor is a prefix of the permutation: what the first leg consumed is exactly perm[:cursor].
            c = first.states[0]["consumed"]
            if c < n:
                assert sorted(x for _, x in first.seen) == sorted(perm[:c])
            cases += 1
        assert sorted(x for _, x in full.seen) == sorted(perm[: len(full.seen)])
    assert cases > 1000


def test_replicated_state_is_identical_on_every_rank_at_step_boundaries() -> None:
    """Whenever all ranks have taken the same number of steps the state dicts agree — except at the one boundary
    the module docstring names (short ranks ran out one step early). There rank 0's copy, the one a replicated
    save keeps, is still exact."""
    ambiguous = 0
    for n, w, b, start in itertools.product((1, 5, 7, 9, 13, 16), (1, 2, 3, 4), (1, 2, 3), (0, 1, 4)):
        if start > n:
            continue
        state = ElasticSampler(n, num_replicas=1, rank=0).state_dict() | {"consumed": start}
        q, rem = divmod(n - start, w)
        for cut in range(0, n + 2):
            leg = Leg(n, w, b, cut, state)
            if leg.equal_steps:
                same = all(s == leg.states[0] for s in leg.states)
                documented = rem > 0 and q % b == 0 and any(leg.exhausted) and not all(leg.exhausted)
                assert same != documented, (n, w, b, start, cut, leg.states)
                ambiguous += documented
            rest = Leg(n, 1, 1, None, leg.states[0])
            assert sorted(x for _, x in leg.seen + rest.seen) == sorted(perm_of(n)[start:]), (n, w, b, start, cut)
    assert ambiguous > 0


def test_rank0_copy_is_exact_even_while_short_ranks_have_joined() -> None:
    """N=9 at W=2 with B=2: rank 0 has 5 samples (3 batches), rank 1 has 4 (2 batches). After step 2 rank 1
    is out; rank 0's state (which the manager keeps) must still leave exactly perm[8] for later."""
    for cut in (1, 2, 3):
        first = Leg(9, 2, 2, cut, None)
        rest = Leg(9, 3, 1, None, first.states[0])
        seen = [x for _, x in first.seen + rest.seen]
        assert sorted(seen) == list(range(9)), cut
    first = Leg(9, 2, 2, 2, None)
    assert [s["consumed"] for s in first.states] == [8, 9]  # the documented case
    first = Leg(9, 2, 2, 3, None)  # after rank 0's extra step (rank 1 joined): both complete
    assert [s["consumed"] for s in first.states] == [9, 9]
    first = Leg(9, 2, 3, 1, None)  # B=3: shares 5 and 4 both take 2 steps, no ambiguity anywhere
    assert [s["consumed"] for s in first.states] == [6, 6]
    first = Leg(9, 2, 3, 2, None)
    assert [s["consumed"] for s in first.states] == [9, 9]


def test_random_chains_of_world_sizes_across_epochs() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(0, 40)
        drop_last = rng.random() < 0.3
        b = rng.randint(1, 4)
        kw = {"drop_last": drop_last, "seed": rng.randint(0, 9)}
        legs_spec = [(rng.randint(1, 5), b, rng.randint(0, 12)) for _ in range(rng.randint(1, 4))]
        legs_spec.append((rng.randint(1, 5), b, None))
        legs = run_chain(n, legs_spec, epochs=3, **kw)
        per = consumed_by_epoch(legs)
        for e in range(3):
            seen = per.get(e, [])
            assert len(seen) == len(set(seen)), (n, legs_spec, e)
            if not drop_last:
                assert sorted(seen) == list(range(n)), (n, legs_spec, e, kw)
            else:
                assert set(seen) == set(perm_of(n, kw["seed"], e)[: len(seen)])
                assert n - len(seen) < 5


def test_global_cursor_function() -> None:
    # 10 samples from cursor 0 on 4 ranks: shares 3, 3, 2, 2
    assert [global_cursor(10, 0, 1, 4, r, drop_last=False) for r in range(4)] == [4] * 4
    assert [global_cursor(10, 0, 2, 4, r, drop_last=False) for r in range(4)] == [8, 8, 10, 10]
    assert [global_cursor(10, 0, 3, 4, r, drop_last=False) for r in range(2)] == [10, 10]
    assert [global_cursor(10, 0, 2, 4, r, drop_last=True) for r in range(4)] == [10] * 4
    # 2 left on 3 ranks: rank 2 has nothing (q == 0, the documented case at the boundary before the step)
    assert [global_cursor(10, 8, 0, 3, r, drop_last=False) for r in range(3)] == [8, 8, 10]
    assert [global_cursor(10, 8, 1, 3, r, drop_last=False) for r in range(2)] == [10, 10]
    assert global_cursor(10, 10, 0, 3, 0, drop_last=False) == 10


# -- the prefetch case: the sampler runs ahead of training -----------------------------------------------------
class Ids(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.timeout(120)
def test_dataloader_with_workers_prefetches_but_the_cursor_counts_consumed() -> None:
    n, b = 64, 4
    sampler = ElasticSampler(Ids(n), num_replicas=2, rank=0, seed=11)
    loader = DataLoader(Ids(n), batch_size=b, sampler=sampler, num_workers=2, prefetch_factor=2)
    seen: list[int] = []
    for i, batch in enumerate(loader):
        seen += batch.tolist()
        sampler.advance(len(batch))
        if i == 2:
            break
    assert sampler.consumed_this_pass == 12
    assert sampler.yielded > sampler.consumed_this_pass  # the loader asked for batches training never saw
    state = sampler.state_dict()
    assert state["consumed"] == 24
    assert seen == perm_of(n, 11)[0:24:2]
    # a resume on 3 ranks picks up at perm[24:], nothing lost to the prefetch, nothing repeated
    samplers = [ElasticSampler(n, num_replicas=3, rank=r, seed=0) for r in range(3)]
    for s in samplers:
        s.load_state_dict(state)
    after = sorted(itertools.chain(*(list(s) for s in samplers)))
    assert after == sorted(perm_of(n, 11)[24:])


def test_advance_is_checked() -> None:
    s = ElasticSampler(10, num_replicas=2, rank=1)
    with pytest.raises(ConfigError, match="yielded only 0"):
        s.advance(1)  # nothing was iterated
    it = iter(s)
    next(it), next(it)
    with pytest.raises(ConfigError, match="not the global batch"):
        s.advance(4)  # e.g. the global batch of 2 ranks x 2
    s.advance(2)
    list(it)
    s.advance(3)
    with pytest.raises(ConfigError, match="consumed 5 of the 5"):
        s.advance(1)
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ConfigError):
            s.advance(bad)  # type: ignore[arg-type]


# -- set_epoch / iteration semantics ---------------------------------------------------------------------------
def test_set_epoch_keeps_a_restored_position_of_the_same_epoch_only(caplog: pytest.LogCaptureFixture) -> None:
    src = ElasticSampler(20, num_replicas=1, rank=0, seed=2)
    src.set_epoch(4)
    it = iter(src)
    [next(it) for _ in range(5)]
    src.advance(5)
    state = src.state_dict()
    assert state["epoch"] == 4 and state["consumed"] == 5
    s = ElasticSampler(20, num_replicas=1, rank=0, seed=2)
    s.load_state_dict(state)
    s.set_epoch(4)  # the usual loop header: no-op
    assert list(s) == perm_of(20, 2, 4)[5:]
    s.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        s.set_epoch(5)
    assert "discards the restored position 5/20 of epoch 4" in caplog.text
    assert list(s) == perm_of(20, 2, 5)


def test_epoch_end_state_yields_nothing_then_next_epoch_is_full() -> None:
    legs = run_chain(13, [(2, 2, 4)])  # 4 steps of 2 per rank at W=2: 7 + 6 samples -> the whole epoch
    state = legs[0].states[0]
    assert state == legs[0].states[1] and state["epoch"] == 0 and state["consumed"] == 13
    samplers = [ElasticSampler(13, num_replicas=3, rank=r) for r in range(3)]
    for s in samplers:
        s.load_state_dict(state)
    assert [list(s) for s in samplers] == [[], [], []]
    for s in samplers:
        s.set_epoch(1)
    assert sorted(itertools.chain(*(list(s) for s in samplers))) == list(range(13))


def test_iterating_again_continues_then_replays_a_finished_epoch() -> None:
    s = ElasticSampler(12, num_replicas=2, rank=0, seed=5)
    p = perm_of(12, 5)
    it = iter(s)
    first = [next(it) for _ in range(2)]
    s.advance(2)
    assert first == p[0:4:2]
    assert list(s) == p[4:12:2]  # a new iterator (after a break) continues at the cursor
    with pytest.raises(ConfigError, match="older iterator"):
        next(it)  # the old iterator is stale now
    s.advance(4)
    assert s.cursor == 12
    assert list(s) == p[0:12:2]  # finished: iterating again replays, like DistributedSampler without set_epoch


def test_len_is_this_ranks_share_of_the_current_pass() -> None:
    s = ElasticSampler(10, num_replicas=3, rank=0)
    assert len(s) == 4
    s.load_state_dict(s.state_dict() | {"consumed": 5})
    assert len(s) == 2  # positions 5 and 8
    assert len(list(s)) == 2


# -- through a real CheckpointManager ---------------------------------------------------------------------------
def test_saved_and_restored_by_the_manager_as_replicated_json(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    model = torch.nn.Linear(2, 2)
    s = ElasticSampler(Ids(30), num_replicas=1, rank=0, seed=9)
    s.set_epoch(2)
    it = iter(s)
    [next(it) for _ in range(7)]
    s.advance(7)
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"model": model, "data": s}, epoch=2)
        s2 = ElasticSampler(Ids(30), num_replicas=1, rank=0, seed=0)
        mgr.restore({"model": torch.nn.Linear(2, 2), "data": s2})
        assert s2.state_dict() == s.state_dict()
        assert s2.seed == 9 and s2.epoch == 2
        assert list(s2) == perm_of(30, 9, 2)[7:]
        loaded = mgr.load(1)["data"]
        assert loaded == s.state_dict()
    manifest = (tmp_path / "ck" / "step-000000000001" / "manifest.json").read_text()
    assert "per_rank" not in manifest  # replicated: one copy for the whole job
    # A checkpoint of another dataset cannot be restored into this sampler.
    with CheckpointManager(root) as mgr, pytest.raises(StateMismatchError, match="dataset of 30 samples"):
        mgr.restore({"data": ElasticSampler(31, num_replicas=1, rank=0)})


# -- hostile / mismatched state ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"consumed": 21}, "consumed must be an int in"),
        ({"consumed": -1}, "consumed must be an int in"),
        ({"consumed": True}, "consumed must be an int in"),
        ({"consumed": 2.0}, "consumed must be an int in"),
        ({"epoch": -1}, "epoch must be an int"),
        ({"epoch": 2**63}, "epoch must be an int"),
        ({"epoch": "1"}, "epoch must be an int"),
        ({"seed": 2**63}, "seed must be an int"),
        ({"seed": None}, "seed must be an int"),
        ({"dataset_size": 10**12}, "dataset of 1000000000000 samples"),
        ({"dataset_size": -3}, "dataset_size must be"),
        ({"shuffle": False}, "shuffle=False"),
        ({"shuffle": 1}, "shuffle must be a bool"),
        ({"order": 12345}, "permutation of epoch 0"),
        ({"order": 2**40}, "32-bit crc"),
        ({"seed": 1}, "permutation of epoch 0"),  # the crc was taken for seed 0
        ({"epoch": 5}, "permutation of epoch 5"),
        ({"extra": 1}, "unexpected keys \\['extra'\\]"),
    ],
)
def test_hostile_state_dicts_are_refused_and_change_nothing(change: dict[str, Any], match: str) -> None:
    s = ElasticSampler(20, num_replicas=2, rank=0)
    good = s.state_dict()
    before = (s.epoch, s.seed, s.cursor, list(s))
    with pytest.raises(StateMismatchError, match=match) as ei:
        s.load_state_dict(good | change)
    assert isinstance(ei.value, CheckpointError) and isinstance(ei.value, KeyError)
    assert (s.epoch, s.seed, s.cursor) == before[:3]


def test_missing_keys_and_non_dicts_are_refused() -> None:
    s = ElasticSampler(5, num_replicas=1, rank=0)
    sd = s.state_dict()
    del sd["order"]
    with pytest.raises(StateMismatchError, match="missing keys \\['order'\\]"):
        s.load_state_dict(sd)
    for bad in ([1, 2], None, "x", 3):
        with pytest.raises(StateMismatchError, match="must be a dict"):
            s.load_state_dict(bad)  # type: ignore[arg-type]


def test_constructor_arguments_are_checked() -> None:
    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([1])

    for kwargs, match in [
        ({"num_replicas": 0}, "num_replicas"),
        ({"num_replicas": 2, "rank": 2}, "rank must be"),
        ({"num_replicas": 2, "rank": -1}, "rank must be"),
        ({"shuffle": 1}, "shuffle must be a bool"),
        ({"drop_last": None}, "drop_last must be a bool"),
        ({"seed": 2**64}, "seed must be"),
        ({"seed": 1.5}, "seed must be"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ElasticSampler(5, **kwargs)
    with pytest.raises(ConfigError, match="IterableDataset"):
        ElasticSampler(Stream())
    with pytest.raises(ConfigError, match="length"):
        ElasticSampler(-1)
    with pytest.raises(ConfigError, match="__len__"):
        ElasticSampler(object())
    with pytest.raises(ConfigError, match="epoch must be"):
        ElasticSampler(5).set_epoch(-1)


def test_defaults_without_torch_distributed() -> None:
    s = ElasticSampler(4)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert list(s) == perm_of(4)
