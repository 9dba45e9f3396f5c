"""Retention policies and select_deletions: pure functions, so every case is a table row."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

import pytest
import torch

import ckptstore.retention as retention
from ckptstore import CheckpointManager
from ckptstore.errors import ConfigError
from ckptstore.retention import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepInterval,
    KeepLast,
    KeepPinned,
    RetentionPolicy,
    coerce_retention,
    explain,
    retention_from_dict,
    select_deletions,
)
from ckptstore.types import CheckpointInfo

# More than 9 steps, with multi-digit numbers: a string sort ("9" > "12" > "1000") would pick the wrong ones.
STEPS = [*range(1, 13), 100, 1000]
NOW = 1_700_000_000.0
HOUR = 3600.0
T0 = 1_699_984_800.0  # 2023-11-14T18:00:00Z, an hour boundary a few hours before NOW


def info(step: int, *, loss: object = None, epoch: int | None = None, t: float | None = None) -> CheckpointInfo:
    metrics = {} if loss is None else {"loss": loss}
    return CheckpointInfo(step=step, epoch=epoch, metrics=metrics, created_at=NOW if t is None else t)


def shuffled(infos: Sequence[CheckpointInfo], seed: int = 0) -> list[CheckpointInfo]:
    # Policies must not depend on the input order.
    out = list(infos)
    random.Random(seed).shuffle(out)
    return out


PLAIN = [info(s) for s in STEPS]
# loss decreasing with the step: the newest steps are the best
LOSS_DOWN = [info(s, loss=1.0 / s) for s in STEPS]
# one loss per step, deliberately non-monotonic
LOSS_MIXED = [info(s, loss={1: 0.5, 2: 0.1, 3: 0.9, 10: 0.2, 12: 0.3, 100: 0.7, 1000: 0.8}.get(s, 0.6)) for s in STEPS]


# -- keep() of each policy ---------------------------------------------------------------------------------------

KEEP_CASES = [
    # (id, policy, infos, expected kept steps)
    ("last-3-integer-order", KeepLast(n=3), PLAIN, {12, 100, 1000}),
    ("last-1", KeepLast(n=1), PLAIN, {1000}),
    ("last-more-than-exist", KeepLast(n=50), PLAIN, set(STEPS)),
    ("last-empty", KeepLast(n=3), [], set()),
    ("best-min", KeepBest(k=2, metric="loss", mode="min"), LOSS_MIXED, {2, 10}),
    ("best-max", KeepBest(k=2, metric="loss", mode="max"), LOSS_MIXED, {3, 1000}),
    ("best-min-default-args", KeepBest(), LOSS_MIXED, {2}),
    ("best-k-exceeds", KeepBest(k=100), [info(1, loss=1.0), info(2)], {1}),
    (
        "best-missing-metric-never-kept",
        KeepBest(k=3),
        [info(1, loss=0.3), info(2), info(3), info(11, loss=0.2), info(12)],
        {1, 11},
    ),
    (
        "best-nan-inf-non-numeric-ignored",
        KeepBest(k=5, mode="min"),
        [
            info(1, loss=float("nan")),
            info(2, loss=float("-inf")),
            info(3, loss=float("inf")),
            info(4, loss="0.1"),
            info(5, loss=True),
            info(6, loss=0.9),
            info(7, loss=5),
        ],
        {6, 7},
    ),
    (
        "best-nan-max-mode",
        KeepBest(k=1, mode="max"),
        [info(1, loss=float("nan")), info(2, loss=0.2), info(3, loss=0.1)],
        {2},
    ),
    (
        "best-tie-prefers-newer-step",
        KeepBest(k=1),
        [info(s, loss=0.5) for s in (9, 10, 100, 11)],
        {100},
    ),
    (
        "best-tie-k2-prefers-newer-steps",
        KeepBest(k=2, mode="max"),
        [info(2, loss=0.9), info(10, loss=0.9), info(1000, loss=0.9), info(5, loss=0.1)],
        {10, 1000},
    ),
    ("best-other-metric-name", KeepBest(k=1, metric="acc", mode="max"), LOSS_MIXED, set()),
    ("every-4-steps", KeepEvery(steps=4), PLAIN, {4, 8, 12, 100, 1000}),
    ("every-100-steps", KeepEvery(steps=100), PLAIN, {100, 1000}),
    ("every-step-0-included", KeepEvery(steps=5), [info(0), info(3), info(5)], {0, 5}),
    (
        "every-2-epochs-first-step",
        KeepEvery(epochs=2),
        # epochs: 1-3 -> 0, 4-6 -> 1, 7-9 -> 2, 10-12 -> 3, 100 -> 4, 1000 -> no epoch
        [info(s, epoch=(s - 1) // 3) for s in range(1, 13)] + [info(100, epoch=4), info(1000)],
        {1, 7, 100},
    ),
    (
        "every-epoch-first-step-integer-order",
        KeepEvery(epochs=1),
        [info(100, epoch=5), info(12, epoch=5), info(9, epoch=5), info(1000, epoch=6)],
        {9, 1000},
    ),
    ("every-epochs-without-epochs", KeepEvery(epochs=1), PLAIN, set()),
    (
        "interval-newest-per-hour",
        KeepInterval(seconds=HOUR),
        # 12 steps, 20 minutes apart, starting on an hour boundary: 4 buckets of 3 steps
        [info(s, t=T0 + (s - 1) * 1200.0) for s in range(1, 13)],
        {3, 6, 9, 12},
    ),
    (
        "interval-clock-goes-backwards",
        KeepInterval(seconds=HOUR),
        # step 12 was stamped in the first hour by a skewed clock: it must win that bucket over steps 1-3
        # (its step number is higher); step 11 still wins the last bucket.
        [info(s, t=T0 + (s - 1) * 1200.0) for s in range(1, 12)] + [info(12, t=T0 + 100)],
        {12, 6, 9, 11},
    ),
    (
        "interval-created-at-in-future",
        KeepInterval(seconds=HOUR),
        # step 3 claims a time a day ahead; it is clamped to now and shares now's bucket with step 1000,
        # which wins by step number. Step 2 (an earlier bucket) is unaffected.
        [info(2, t=NOW - 2 * HOUR), info(3, t=NOW + 86400), info(1000, t=NOW)],
        {2, 1000},
    ),
    (
        "interval-newer-step-stamped-earlier-same-bucket",
        KeepInterval(seconds=HOUR),
        # within one bucket the winner is the highest step, not the latest created_at
        [info(10, t=NOW - 10), info(11, t=NOW - 20), info(100, t=NOW - 700)],
        {100},
    ),
    (
        "interval-non-finite-created-at-ignored",
        KeepInterval(seconds=HOUR),
        [info(1, t=float("nan")), info(2, t=NOW)],
        {2},
    ),
    ("pinned", KeepPinned(steps=[5, 100, 77]), PLAIN, {5, 100}),
    ("pinned-empty", KeepPinned(), PLAIN, set()),
    ("union-last-best", KeepLast(n=2) | KeepBest(k=2), LOSS_MIXED, {100, 1000, 2, 10}),
    (
        "union-three",
        AnyOf(KeepLast(n=1), KeepEvery(steps=5), KeepPinned(steps=[3])),
        PLAIN,
        {1000, 5, 10, 100, 3},
    ),
]


@pytest.mark.parametrize(("policy", "infos", "expected"), [c[1:] for c in KEEP_CASES], ids=[c[0] for c in KEEP_CASES])
def test_keep(policy: RetentionPolicy, infos: list[CheckpointInfo], expected: set[int]) -> None:
    assert policy.keep(shuffled(infos), now=NOW) == expected
    assert policy.keep(list(reversed(infos)), now=NOW) == expected


def test_duplicate_infos_count_once() -> None:
    infos = [info(5, loss=0.1), info(5, loss=0.1), info(6, loss=0.2)]
    assert KeepBest(k=2).keep(infos, now=NOW) == {5, 6}
    assert KeepLast(n=2).keep(infos, now=NOW) == {5, 6}


def test_interval_bucket_is_aligned_to_unix_epoch() -> None:
    # 10:59:59 and 11:00:00 UTC are different buckets even one second apart
    boundary = 1_700_002_800.0  # a multiple of 3600
    infos = [info(1, t=boundary - 1), info(2, t=boundary)]
    assert KeepInterval(seconds=HOUR).keep(infos, now=boundary + 10) == {1, 2}


def test_interval_always_keeps_newest_step_whatever_the_clock() -> None:
    rng = random.Random(7)
    for _ in range(200):
        steps = rng.sample(range(2000), rng.randint(1, 30))
        infos = [info(s, t=NOW + rng.uniform(-5 * 86400, 5 * 86400)) for s in steps]
        kept = KeepInterval(seconds=rng.choice([1.0, 60.0, HOUR, 86400.0])).keep(infos, now=NOW)
        assert max(steps) in kept
        # a kept step is always the highest step of its bucket, so no newer step of the bucket was dropped
        assert len(kept) <= len(steps)


# -- union ---------------------------------------------------------------------------------------------------------


def test_union_operator_flattens_and_compares_equal() -> None:
    a, b, c = KeepLast(n=3), KeepBest(k=1), KeepPinned(steps=[1])
    assert (a | b) | c == AnyOf(a, b, c)
    assert a | (b | c) == AnyOf(a, b, c)
    assert (a | b).policies == (a, b)
    assert repr(a | b) == "AnyOf(KeepLast(n=3), KeepBest(k=1, metric='loss', mode='min'))"


def test_union_with_custom_policy_both_sides() -> None:
    class KeepOdd:
        def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
            return {i.step for i in infos if i.step % 2}

    odd = KeepOdd()
    assert isinstance(odd, RetentionPolicy)
    assert (KeepLast(n=1) | odd).keep(PLAIN, now=NOW) == {1, 3, 5, 7, 9, 11, 1000}
    assert (odd | KeepLast(n=1)).keep(PLAIN, now=NOW) == {1, 3, 5, 7, 9, 11, 1000}


def test_union_is_union_of_members() -> None:
    members = [KeepLast(n=2), KeepBest(k=3), KeepEvery(steps=3), KeepPinned(steps=[1, 7])]
    union = AnyOf(*members)
    expected = set().union(*(m.keep(LOSS_MIXED, now=NOW) for m in members))
    assert union.keep(LOSS_MIXED, now=NOW) == expected


def test_anyof_rejects_non_policies() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        AnyOf()
    with pytest.raises(ConfigError, match="retention policies"):
        AnyOf(KeepLast(n=1), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        KeepLast(n=1) | 3  # type: ignore[operator]


# -- select_deletions and its guarantees --------------------------------------------------------------------------

DELETE_CASES = [
    # (id, policy, infos, kwargs, expected deletions)
    ("none-policy-deletes-nothing", None, PLAIN, {}, []),
    ("last-2", KeepLast(n=2), PLAIN, {}, list(range(1, 13))),
    (
        "last-2-pinned-and-protected",
        KeepLast(n=2),
        PLAIN,
        {"pinned": [3], "protect": [7]},
        [1, 2, 4, 5, 6, 8, 9, 10, 11, 12],
    ),
    ("pinned-only-keeps-newest", KeepPinned(steps=[1]), PLAIN, {}, [*range(2, 13), 100]),
    ("best-only-keeps-newest-too", KeepBest(k=1), LOSS_MIXED, {}, [1, *range(3, 13), 100]),
    ("every-steps", KeepEvery(steps=4), PLAIN, {}, [1, 2, 3, 5, 6, 7, 9, 10, 11]),
    ("dict-policy", {"keep_last": 13}, PLAIN, {}, [1]),
    ("empty", KeepLast(n=1), [], {}, []),
    ("single-step", KeepPinned(steps=[]), [info(1000)], {}, []),
]


@pytest.mark.parametrize(
    ("policy", "infos", "kwargs", "expected"),
    [c[1:] for c in DELETE_CASES],
    ids=[c[0] for c in DELETE_CASES],
)
def test_select_deletions(
    policy: RetentionPolicy | None, infos: list[CheckpointInfo], kwargs: dict, expected: list[int]
) -> None:
    got = select_deletions(shuffled(infos, seed=3), policy, now=NOW, **kwargs)
    assert got == expected
    assert got == sorted(got)
    assert all(type(s) is int for s in got)


def test_newest_is_the_highest_step_number_not_the_latest_created_at() -> None:
    # step 1000 has the oldest timestamp; step 12 the newest. 1000 is the newest *step*.
    infos = [info(s, t=NOW - s) for s in STEPS]
    doomed = select_deletions(infos, KeepPinned(steps=[]), now=NOW)
    assert 1000 not in doomed
    assert 12 in doomed and 100 in doomed


def test_current_best_is_never_deleted_even_if_a_subclass_forgets_it() -> None:
    class ForgetfulBest(KeepBest):
        def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
            return set()

    policy = KeepLast(n=1) | ForgetfulBest(k=3, metric="loss", mode="min")
    doomed = select_deletions(LOSS_MIXED, policy, now=NOW)
    assert 2 not in doomed  # loss 0.1: the current best
    assert 10 in doomed  # second best: only the *current* best is guaranteed
    reasons = {d.step: d.reasons for d in explain(LOSS_MIXED, policy, now=NOW)}
    assert reasons[2] == ("current best by loss (min)",)


def test_guarantees_hold_for_random_inputs() -> None:
    rng = random.Random(1234)
    policies: list[RetentionPolicy] = [
        KeepLast(n=1),
        KeepBest(k=1),
        KeepBest(k=2, mode="max"),
        KeepEvery(steps=7),
        KeepEvery(epochs=3),
        KeepInterval(seconds=60),
        KeepPinned(steps=[]),
    ]
    for _ in range(300):
        steps = rng.sample(range(5000), rng.randint(1, 25))
        infos = [
            info(
                s,
                loss=rng.choice([None, float("nan"), rng.random(), rng.random()]),
                epoch=rng.choice([None, s // 100]),
                t=NOW + rng.uniform(-3600, 3600),
            )
            for s in steps
        ]
        policy = AnyOf(*rng.sample(policies, rng.randint(1, 3)))
        pinned = rng.sample(steps, min(len(steps), rng.randint(0, 2)))
        protect = rng.sample(steps, min(len(steps), rng.randint(0, 2)))
        doomed = select_deletions(infos, policy, now=NOW, pinned=pinned, protect=protect)
        assert doomed == sorted(set(doomed))
        assert max(steps) not in doomed
        assert not set(doomed) & set(pinned)
        assert not set(doomed) & set(protect)
        assert not set(doomed) & policy.keep(infos, now=NOW)
        for p in policy.policies:
            if isinstance(p, KeepBest) and (ranked := p.ranked(infos)):
                assert ranked[0][0] not in doomed
        # everything else is deleted: the policy is the only thing that keeps steps
        survivors = set(steps) - set(doomed)
        assert survivors == policy.keep(infos, now=NOW) | {max(steps)} | set(pinned) | set(protect)


# -- the one ranking of "best": rank_by_metric, KeepBest and CheckpointManager.best() --------------------------------

NAN, INF = float("nan"), float("inf")
HUGE = 10**400  # a JSON manifest can hold it; float(HUGE) raises OverflowError

RANK_CASES = [
    # (id, losses by step, mode, expected ranking best first)
    ("min", {1: 0.5, 2: 0.1, 3: 0.9}, "min", [2, 1, 3]),
    ("max", {1: 0.5, 2: 0.1, 3: 0.9}, "max", [3, 1, 2]),
    ("minus-inf-never-best-in-min", {1: -INF, 2: 0.3, 3: 0.2}, "min", [3, 2]),
    ("plus-inf-never-best-in-max", {1: INF, 2: 0.3, 3: 0.2}, "max", [2, 3]),
    ("nan-never-ranks", {1: NAN, 2: 0.3, 3: NAN}, "min", [2]),
    ("nan-never-ranks-max", {1: NAN, 2: 0.3, 3: NAN}, "max", [2]),
    ("only-non-finite-means-no-best", {1: NAN, 2: INF, 3: -INF}, "min", []),
    ("non-numeric-and-bool-never-rank", {1: "0.1", 2: True, 3: None, 4: [0.1], 5: 0.7}, "min", [5]),
    ("ints-and-floats-mix", {1: 2, 2: 1.5, 3: 1}, "min", [3, 2, 1]),
    ("huge-int-max", {1: 1e308, 2: HUGE, 3: 7}, "max", [2, 1, 3]),
    ("huge-int-min", {1: 1e308, 2: HUGE, 3: 7}, "min", [3, 1, 2]),
    ("negative-huge-int-min", {1: -1e308, 2: -HUGE, 3: 0.0}, "min", [2, 1, 3]),
    ("huge-ints-compare-exactly", {1: HUGE + 1, 2: HUGE, 3: HUGE + 2}, "max", [3, 1, 2]),
    ("tie-newer-step-first-min", {9: 0.5, 100: 0.5, 11: 0.5, 3: 0.7}, "min", [100, 11, 9, 3]),
    ("tie-newer-step-first-max", {9: 0.5, 100: 0.5, 11: 0.5, 3: 0.7}, "max", [3, 100, 11, 9]),
    ("tie-int-and-float", {4: 1, 5: 1.0}, "min", [5, 4]),
    ("empty", {}, "min", []),
]


def _losses(losses: dict[int, object]) -> list[CheckpointInfo]:
    return shuffled([CheckpointInfo(step=s, metrics={} if v is None else {"loss": v}) for s, v in losses.items()])


@pytest.mark.parametrize(("losses", "mode", "expected"), [c[1:] for c in RANK_CASES], ids=[c[0] for c in RANK_CASES])
def test_rank_by_metric(losses: dict[int, object], mode: str, expected: list[int]) -> None:
    infos = _losses(losses)
    assert [i.step for i in retention.rank_by_metric(infos, "loss", mode)] == expected


@pytest.mark.parametrize(("losses", "mode", "expected"), [c[1:] for c in RANK_CASES], ids=[c[0] for c in RANK_CASES])
def test_keep_best_follows_the_ranking_and_never_raises(
    losses: dict[int, object], mode: str, expected: list[int]
) -> None:
    infos = _losses(losses)
    policy = KeepBest(k=2, metric="loss", mode=mode)
    assert [s for s, _ in policy.ranked(infos)] == expected
    assert policy.keep(infos, now=NOW) == set(expected[:2])
    doomed = select_deletions(infos, policy, now=NOW)  # raised OverflowError on a huge int before
    newest = max(losses, default=None)
    assert set(doomed) == set(losses) - set(expected[:2]) - {newest}
    for d in explain(infos, policy, now=NOW):
        assert d.describe()  # the reason text of a huge metric is formatted without overflowing


def test_explain_shows_a_huge_metric() -> None:
    infos = [info(1, loss=HUGE), info(2, loss=0.5), info(3)]
    reasons = {d.step: d.describe() for d in explain(infos, KeepBest(k=2, mode="max"), now=NOW)}
    assert reasons[1] == "kept: best 2 by loss (max) [loss=1e+400]"
    assert reasons[2] == "kept: best 2 by loss (max) [loss=0.5]"


def test_rank_by_metric_counts_a_step_once_and_returns_the_given_infos() -> None:
    first, second = CheckpointInfo(step=5, metrics={"loss": 0.9}), CheckpointInfo(step=5, metrics={"loss": 0.1})
    other = CheckpointInfo(step=6, metrics={"loss": 0.5})
    ranked = retention.rank_by_metric([first, other, second], "loss", "min")
    assert ranked == [other, first] and ranked[1] is first


def test_rank_by_metric_tolerates_hostile_infos() -> None:
    class Odd:
        step = 3
        metrics = ["not", "a", "mapping"]

    infos = [Odd(), CheckpointInfo(step=1, metrics={"loss": 0.2}), CheckpointInfo(step=2)]
    assert [i.step for i in retention.rank_by_metric(infos, "loss", "min")] == [1]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("metric", "mode", "message"),
    [
        ("loss", "avg", "mode must be 'min' or 'max', got 'avg'"),
        ("loss", None, "mode must be 'min' or 'max', got None"),
        ("", "min", "metric must be a non-empty string"),
        (3, "min", "metric must be a non-empty string"),
    ],
)
def test_rank_by_metric_rejects_bad_arguments(metric: object, mode: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        retention.rank_by_metric([], metric, mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_manager_best_is_the_step_keep_best_keeps(tmp_path, mode: str) -> None:
    # Losses chosen so that the old best() (which skipped only NaN) and KeepBest (finite only) disagreed: -inf
    # won "min" and +inf won "max" in best(), and the huge int made best() raise OverflowError.
    losses = {1: 0.4, 2: -INF, 3: INF, 4: NAN, 5: 0.2, 6: 0.2, 7: HUGE, 8: -HUGE, 9: "x", 10: None, 11: 0.3}
    expected = [8, 6, 5, 11, 1, 7] if mode == "min" else [7, 1, 11, 6, 5, 8]
    policy = KeepBest(k=1, metric="loss", mode=mode)
    with CheckpointManager(str(tmp_path / "ckpt"), retention=policy) as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"w": torch.zeros(1)}, metrics={} if loss is None else {"loss": loss})
            best = mgr.best("loss", mode)  # type: ignore[arg-type]
            # after every commit, best() is the step retention just kept (newest aside)
            survivors = set(mgr.steps())
            assert survivors <= {step} | ({best.step} if best else set())
            if best is not None:
                assert best.step in survivors
                assert best.step == policy.ranked(mgr.history())[0][0]
        assert best is not None and best.step == expected[0]
        ranked = retention.rank_by_metric(mgr.history(), "loss", mode)
        assert [i.step for i in ranked] == [expected[0], 11]  # the others were deleted: the best and newest remain
        assert mgr.steps() == sorted({expected[0], 11})
        assert torch.equal(mgr.load("best")["w"], torch.zeros(1))


def test_manager_best_ranks_every_committed_step(tmp_path) -> None:
    losses = {1: 0.4, 2: -INF, 3: INF, 4: NAN, 5: 0.2, 6: 0.2, 7: HUGE, 8: -HUGE, 9: "x", 10: None, 11: 0.3}
    with CheckpointManager(str(tmp_path / "ckpt")) as mgr:  # no retention: every step stays
        for step, loss in losses.items():
            mgr.save(step, {"w": torch.full((1,), float(step))}, metrics={} if loss is None else {"loss": loss})
        assert mgr.best("loss", "min").step == 8  # type: ignore[union-attr]
        assert mgr.best("loss", "max").step == 7  # type: ignore[union-attr]
        assert mgr.best("missing") is None
        for mode in ("min", "max"):
            order = [i.step for i in retention.rank_by_metric(mgr.history(), "loss", mode)]
            assert order == ([8, 6, 5, 11, 1, 7] if mode == "min" else [7, 1, 11, 6, 5, 8])
            assert mgr.best("loss", mode).step == order[0]  # type: ignore[arg-type, union-attr]
        assert torch.equal(mgr.load("best")["w"], torch.full((1,), 8.0))
        with pytest.raises(ConfigError, match="mode must be 'min' or 'max'"):
            mgr.best("loss", "avg")  # type: ignore[arg-type]


# -- explain -------------------------------------------------------------------------------------------------------


def test_explain_reasons() -> None:
    infos = [info(s, loss=0.5, epoch=0) for s in STEPS if s not in (2, 10)]
    infos += [info(2, loss=0.1, epoch=0), info(10, loss=0.2, epoch=0)]
    policy = KeepLast(n=3) | KeepBest(k=2, metric="loss", mode="min") | KeepPinned(steps=[5])
    decisions = explain(infos, policy, now=NOW, protect=[7])
    assert [d.step for d in decisions] == STEPS
    by_step = {d.step: d for d in decisions}
    assert by_step[1000].describe() == "kept: last 3; newest committed step"
    assert by_step[12].describe() == "kept: last 3"
    assert by_step[2].describe() == "kept: best 2 by loss (min) [loss=0.1]"
    assert by_step[5].describe() == "kept: pinned"
    assert by_step[7].describe() == "kept: protected (in use)"
    assert by_step[3].describe() == "deleted: not kept by any policy"
    assert str(by_step[3]) == "step 3: deleted: not kept by any policy"
    assert by_step[3].to_dict() == {"step": 3, "action": "delete", "reasons": ["not kept by any policy"]}
    assert by_step[5].to_dict() == {"step": 5, "action": "keep", "reasons": ["pinned"]}
    assert [d.step for d in decisions if not d.keep] == select_deletions(infos, policy, now=NOW, protect=[7])


def test_explain_detail_of_epoch_interval_and_custom_policies() -> None:
    class Everything:
        def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
            return {i.step for i in infos}

        def __repr__(self) -> str:
            return "Everything()"

    infos = [info(1, epoch=0, t=T0 + 5), info(2, epoch=0, t=T0 + 10)]
    reasons = {d.step: d.reasons for d in explain(infos, KeepEvery(epochs=1) | KeepInterval(seconds=HOUR), now=NOW)}
    assert reasons[1] == ("first step of every epoch [epoch 0]",)
    assert reasons[2] == ("newest step per 3600s interval [from 2023-11-14T18:00:00Z]", "newest committed step")
    assert explain(infos, Everything(), now=NOW)[0].reasons == ("Everything()",)
    assert explain(infos, None, now=NOW)[0].describe() == "kept: no retention policy"


def test_pinned_reason_is_not_repeated() -> None:
    d = explain(PLAIN, KeepPinned(steps=[3]), now=NOW, pinned=[3])
    assert d[2].reasons == ("pinned",)


# -- validation of policy objects --------------------------------------------------------------------------------

BAD_POLICIES = [
    (lambda: KeepLast(n=0), "KeepLast: n must be a positive integer"),
    (lambda: KeepLast(n=True), "got True (bool)"),
    (lambda: KeepLast(n="3"), "got '3' (str)"),
    (lambda: KeepBest(k=0), "KeepBest: k must be a positive integer"),
    (lambda: KeepBest(mode="avg"), "mode must be 'min' or 'max', got 'avg'"),
    (lambda: KeepBest(metric=""), "metric must be a non-empty string"),
    (lambda: KeepEvery(), "exactly one of steps= or epochs="),
    (lambda: KeepEvery(steps=2, epochs=2), "exactly one of steps= or epochs="),
    (lambda: KeepEvery(epochs=-1), "KeepEvery: epochs must be a positive integer"),
    (lambda: KeepInterval(seconds=0), "KeepInterval: seconds must be a positive number"),
    (lambda: KeepInterval(seconds=math.inf), "KeepInterval: seconds must be a positive number"),
    (lambda: KeepPinned(steps="12"), "must be a list of step numbers"),
    (lambda: KeepPinned(steps=[1, -2]), "non-negative integer steps, got -2"),
    (lambda: KeepPinned(steps=[1.5]), "non-negative integer steps, got 1.5"),
]


@pytest.mark.parametrize(("make", "message"), BAD_POLICIES)
def test_policy_validation(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        make()
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_policies_are_frozen_keyword_only_and_hashable() -> None:
    p = KeepLast(n=3)
    with pytest.raises(AttributeError):
        p.n = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        KeepLast(3)  # type: ignore[misc]
    assert KeepPinned(steps=[3, 1, 3]) == KeepPinned(steps=(1, 3))
    assert len({KeepLast(n=3), KeepLast(n=3), KeepLast(n=3) | KeepBest()}) == 2
    assert repr(KeepEvery(epochs=2)) == "KeepEvery(epochs=2)"


# -- dict / YAML form --------------------------------------------------------------------------------------------

FROM_DICT_CASES = [
    (None, None),
    ({}, None),
    ({"keep_last": 3}, KeepLast(n=3)),
    ({"keep_best": {"k": 2, "metric": "acc", "mode": "max"}}, KeepBest(k=2, metric="acc", mode="max")),
    ({"keep_best": {}}, KeepBest(k=1, metric="loss", mode="min")),
    ({"keep_every_steps": 500}, KeepEvery(steps=500)),
    ({"keep_every_epochs": 2}, KeepEvery(epochs=2)),
    ({"keep_interval_seconds": 3600}, KeepInterval(seconds=3600.0)),
    ({"keep_interval_seconds": 0.5}, KeepInterval(seconds=0.5)),
    ({"pinned": [10, 2]}, KeepPinned(steps=(2, 10))),
    (
        {"pinned": [7], "keep_last": 2, "keep_best": {"k": 1}},
        AnyOf(KeepLast(n=2), KeepBest(k=1), KeepPinned(steps=(7,))),
    ),
]


@pytest.mark.parametrize(("d", "expected"), FROM_DICT_CASES)
def test_retention_from_dict(d: dict | None, expected: RetentionPolicy | None) -> None:
    assert retention_from_dict(d) == expected


BAD_DICTS = [
    ({"keep_lst": 3}, ["unknown retention key 'keep_lst'", "did you mean 'keep_last'?", "valid keys: keep_best"]),
    ({"keep_every_step": 3}, ["'keep_every_step'", "did you mean 'keep_every_steps'?"]),
    ({"pinned_steps": [1]}, ["'pinned_steps'", "did you mean 'pinned'?"]),
    ({"zzz": 1}, ["unknown retention key 'zzz'; valid keys: keep_best, keep_every_epochs"]),
    ({"keep_last": "3"}, ["retention.keep_last must be a positive integer (>= 1), got '3' (str)"]),
    ({"keep_last": 0}, ["retention.keep_last must be a positive integer (>= 1), got 0 (int)"]),
    ({"keep_last": True}, ["retention.keep_last must be a positive integer (>= 1), got True (bool)"]),
    ({"keep_last": 2.0}, ["retention.keep_last must be a positive integer", "(float)"]),
    ({"keep_last": None}, ["retention.keep_last must be a positive integer", "got None (null)"]),
    ({"keep_best": 3}, ["retention.keep_best must be a mapping like {k: 2, metric: loss, mode: min}"]),
    ({"keep_best": {"k": 1, "mode": "avg"}}, ["retention.keep_best.mode must be 'min' or 'max', got 'avg'"]),
    ({"keep_best": {"K": 1}}, ["unknown retention.keep_best key 'K' (did you mean 'k'?)"]),
    ({"keep_best": {"metrc": "loss"}}, ["'metrc' (did you mean 'metric'?)", "valid keys: k, metric, mode"]),
    ({"keep_best": {"k": -1}}, ["retention.keep_best.k must be a positive integer"]),
    ({"keep_best": {"metric": 3}}, ["retention.keep_best.metric must be a non-empty string"]),
    ({"keep_every_steps": 0}, ["retention.keep_every_steps must be a positive integer"]),
    ({"keep_every_epochs": "2"}, ["retention.keep_every_epochs must be a positive integer"]),
    ({"keep_interval_seconds": "1h"}, ["retention.keep_interval_seconds must be a positive number, got '1h'"]),
    ({"keep_interval_seconds": -5}, ["retention.keep_interval_seconds must be a positive number"]),
    ({"pinned": 5}, ["retention.pinned must be a list of step numbers, got 5 (int)"]),
    ({"pinned": ["5"]}, ["retention.pinned must contain non-negative integer steps, got '5' (str)"]),
    ([3], ["retention must be a mapping with keys keep_last"]),
]


@pytest.mark.parametrize(("d", "fragments"), BAD_DICTS)
def test_retention_from_dict_errors(d: object, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        retention_from_dict(d)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(e.value)


def test_coerce_retention() -> None:
    policy = KeepLast(n=2) | KeepPinned(steps=[1])
    assert coerce_retention(None) is None
    assert coerce_retention(policy) is policy
    assert coerce_retention({"keep_last": 2}) == KeepLast(n=2)
    with pytest.raises(ConfigError, match=r"not the class KeepLast \(e\.g\. KeepLast\(n=3\)\)"):
        coerce_retention(KeepLast)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="retention must be None, a dict or a policy object"):
        coerce_retention(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="did you mean 'keep_last'"):
        coerce_retention({"keep-last": 2})
