"""The read-once plan (issue #16 item 5) without processes: owners, the per-rank keys a job never shares."""

from __future__ import annotations

import torch

from ckptstore import PerRank
from ckptstore.format.state import flatten, per_rank_keys
from ckptstore.restore.shared import _owners


def test_owners_are_contiguous_balanced_runs() -> None:
    pieces = [(("a", i * 100, i * 100 + 100), 100) for i in range(10)] + [(("b", 0, 1000), 1000)]
    own = _owners(pieces, 4)
    assert own == _owners(list(reversed(pieces)), 4)  # the same on every rank, whatever the order it saw
    order = [own[p] for p, _ in sorted(pieces)]
    assert order == sorted(order)  # runs in file order: an owner's pieces are neighbours
    load = [sum(n for p, n in pieces if own[p] == r) for r in range(4)]
    assert max(load) <= 1000 and len(set(own.values())) >= 3  # no owner above the largest piece or a quarter
    assert _owners(pieces, 1) == {p: 0 for p, _ in pieces}


def test_per_rank_keys_are_the_tensors_under_per_rank_nodes() -> None:
    flat = flatten({"model": {"w": torch.ones(2)}, "rng": PerRank({"s": torch.zeros(3)})}, rank=1)
    assert per_rank_keys(flat.tree) == set(flat.tensors) - {"model/w"}
