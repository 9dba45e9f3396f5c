"""Elastic data position: a global cursor that survives a change of world size (2 ranks -> 3 -> 1).

``PerRank`` state (a sampler position, an RNG state) is restored on the rank that saved it, so a job saved at 2
ranks and restored at 3 leaves rank 2 fresh and the data order after resume is wrong. :class:`ElasticSampler`
stores one *global* cursor instead — ``(epoch, seed, samples consumed by all ranks together)`` — and
partitions the rest of the epoch over the world size of the job that resumes. Every sample of an epoch is
consumed exactly once, at any sequence of world sizes, and the *global* order (the epoch's permutation) is the
one an uninterrupted run would have used; only which rank gets which sample changes.

Example (every rank; the sampler is saved once, as replicated state — not ``PerRank``)::

    sampler = ElasticSampler(dataset, seed=0)        # world size and rank from torch.distributed
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=4)
    step = 0
    if mgr.latest() is not None:                     # at any world size: the rest of the epoch is re-partitioned
        step = mgr.restore({"model": model, "optim": opt, "data": sampler}).step
    for epoch in range(sampler.epoch, epochs):
        sampler.set_epoch(epoch)        # no-op for the restored epoch: keeps the restored position
        for x, y in loader:
            train_step(x, y)
            sampler.advance(len(x))     # what training consumed on this rank, not what the loader prefetched
            step += 1
            if step % 500 == 0:
                mgr.save(step, {"model": model, "optim": opt, "data": sampler}, epoch=epoch)

How the cursor works
--------------------
The epoch's permutation ``perm`` depends only on ``(seed, epoch)`` (``torch.randperm`` with a generator seeded
``seed + epoch``, the same on every rank and the same as :class:`~torch.utils.data.DistributedSampler`). A pass
that starts at global cursor ``c`` on ``W`` ranks gives rank ``r`` the positions ``c + r, c + r + W, ...``: at
``c = 0`` that is exactly DistributedSampler's order whenever it needs no padding (``len % W == 0`` or
``drop_last=True``). When every rank has consumed ``k`` samples of the pass, the positions ``c .. c + k*W - 1``
are done, so the global cursor is ``c + k*W`` — computed locally, with no communication, and the same on every
rank.

Why ``advance()`` and not counting what the sampler yields: a ``DataLoader`` with ``num_workers > 0`` asks the
sampler for ``prefetch_factor * num_workers`` batches ahead of training (and a single-process loader for the
batch being trained on), so the sampler always runs ahead of what the model has seen. Counting yields would
make a checkpoint skip the prefetched batches. The training loop therefore tells the sampler what it consumed,
``sampler.advance(len(batch))`` after the step; ``state_dict()`` reports the cursor from those counts.
(A ``state_dict(batches_consumed)`` would do the same, but the manager calls ``state_dict()`` without
arguments; ``yielded`` is still counted, for diagnostics.) ``advance`` refuses more than this rank's share or more than
was yielded, which catches e.g. ``advance(global_batch)`` instead of the per-rank batch.

The tail of an epoch. With ``R = len - c`` samples left, ``q, rem = divmod(R, W)``:

* ``drop_last=False``: ranks ``r < rem`` get ``q + 1`` samples, the others ``q`` — exactly once, no padding
  (DistributedSampler would repeat samples to even the ranks out). A rank that has consumed its whole share
  reports ``consumed == len`` (the epoch is complete). That is exact whenever every rank runs the same number
  of steps in the pass. They do unless ``q`` is a multiple of the per-rank batch size (``q == 0`` included)
  and ``rem > 0``: then the ``q + 1`` ranks take one step more (DDP needs ``model.join()`` for that), and at
  the boundary before that step the short ranks already report the epoch as complete while the others do
  not. Rank 0 is always one of the ``q + 1`` ranks, its view is exact at every boundary, and rank 0's copy is
  the one a replicated save keeps — so even that checkpoint resumes exactly; only the copies differ. (Knowing
  the batch size would not help: a short rank cannot see whether the others took their extra step, so it
  would be wrong after that step instead, e.g. at an end-of-epoch save.)
* ``drop_last=True``: every rank gets ``q``; the last ``rem`` positions are skipped and the epoch counts as
  complete once every rank consumed its ``q``. Which samples are dropped depends on the world size of the
  pass that reaches the end of the epoch (at most ``W - 1`` of them).

All of this assumes the ranks step in lockstep (each consumes one batch per step, as data-parallel training
does) at the points where ``state_dict()`` is taken, i.e. at ``mgr.save``. The state is a plain dict of JSON
values saved once: the manager keeps rank 0's copy of replicated values without comparing them, so a rank
that had consumed a different amount (or used another ``seed``) would silently lose its view.

Semantics of the calls
----------------------
* ``set_epoch(e)`` with another epoch starts that epoch at cursor 0; with the current epoch it does nothing, so
  the usual ``for epoch in range(sampler.epoch, n): sampler.set_epoch(epoch)`` keeps a restored position.
* ``load_state_dict(sd)`` sets the epoch, the seed and the cursor; the next ``iter()`` partitions the rest of
  that epoch over the *current* ``num_replicas``. A cursor at the end of the epoch yields nothing (the epoch was
  finished before the checkpoint); ``set_epoch(epoch + 1)`` then starts the next one.
* ``iter()`` again in the same epoch continues from the cursor (after a ``break``, say); once this rank has
  consumed its whole share, it replays the epoch from the start, as DistributedSampler does without
  ``set_epoch``. Restore *before* creating the loader's iterator: an iterator made before ``load_state_dict`` /
  ``set_epoch`` raises ``ConfigError`` instead of yielding the old order.
* Use the sampler's ``drop_last``, not the DataLoader's: a loader that drops a partial last batch leaves
  samples the sampler handed out unconsumed, and the cursor (rightly) does not pass them, so the epoch never
  counts as complete before ``set_epoch``.
* The state holds ``dataset_size``, ``shuffle`` and ``order`` (a crc32 of the epoch's permutation) besides the
  cursor. A restore into a dataset of another length, another ``shuffle`` or a torch whose ``randperm``
  produces another permutation is refused with ``StateMismatchError``: the cursor would point into a different
  order and samples would be repeated or skipped silently. ``seed`` is taken from the checkpoint.

Per-rank randomness (augmentation) does not survive a change of world size either; derive it from the sample
(e.g. seed the augmentation with ``hash((seed, epoch, index))`` in ``__getitem__``) rather than from a per-rank
RNG state, and it becomes independent of the partition too.

Iterable datasets
-----------------
An ``IterableDataset`` has no index, so a cursor cannot be re-partitioned sample by sample. What to store is
one position per *global stream*: the data is split into ``S`` shards (files, or fixed sub-streams), with
``S`` several times any world size, and the state is ``{"epoch", "seed", "offsets": {shard: records
consumed}}`` covering *all* shards. Exact re-partitioning then needs a deterministic shard assignment — a pure
function of ``(shard list, epoch, seed, world size)``, e.g. the not-finished shards in a seeded order dealt
round-robin to the ranks — and the ability to skip ``offset`` records (or seek) inside a shard. The pattern:

1. the dataset yields ``(shard, index_in_shard, sample)``, so the training loop (not the prefetching workers)
   knows what it consumed and updates its own ``{shard: offset}`` after each step;
2. before each save, ``torch.distributed.all_gather_object`` the per-rank tables and merge them into the one
   global table, identical on every rank, which is saved as replicated state (with ``PerRank`` tables the
   entries of ranks that no longer exist would be lost and new ranks would get none — the bug this module
   fixes for map-style data);
3. on restore, every rank reads the whole table, computes the assignment for the new world size and starts
   each of its shards at the stored offset.

Shards end unevenly, so ranks run out at different times; balance with many small shards, or hand out
shards dynamically from rank 0 (then the table is all the state there is). If the records can be indexed
(a map-style index over the files), prefer :class:`ElasticSampler` over that index: it is exact per sample.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler

from .errors import ConfigError, StateMismatchError

log = logging.getLogger("ckptstore")

_INT63 = 2**63
_STATE_KEYS = ("epoch", "seed", "consumed", "dataset_size", "shuffle", "order")

__all__ = ["ElasticSampler"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _share(remaining: int, world: int, rank: int, drop_last: bool) -> int:
    """Samples rank ``rank`` of ``world`` gets from a pass over ``remaining`` samples."""
    q, rem = divmod(remaining, world)
    return q if drop_last else q + (rank < rem)


def global_cursor(size: int, start: int, taken: int, world: int, rank: int, *, drop_last: bool) -> int:
    """The global cursor seen by ``rank`` after it consumed ``taken`` samples of a pass that started at
    ``start`` on ``world`` ranks (positions below it are consumed, or dropped by ``drop_last``). Pure; see the
    module docstring for the tail rules."""
    q, rem = divmod(size - start, world)
    mine = q if drop_last else q + (rank < rem)
    if taken < mine:
        return start + taken * world
    # This rank consumed its whole share. In lockstep the others did too — except when this is a short rank
    # (one sample fewer than the ranks < rem) and q is a multiple of the batch size, so the long ranks still
    # have a step to take. It cannot tell, and says "complete"; rank 0 is never short, its view stays exact.
    return size


def _permutation(size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(size, dtype=torch.int64)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(size, generator=g)


def _order_crc(perm: torch.Tensor) -> int:
    return zlib.crc32(memoryview(perm.numpy().astype("<i8", copy=False)).cast("B")) & 0xFFFFFFFF


def _dataset_size(dataset_or_len: Any) -> int:
    if _is_int(dataset_or_len):
        if dataset_or_len < 0:
            raise ConfigError(f"ElasticSampler: the dataset length must be >= 0, got {dataset_or_len}")
        return int(dataset_or_len)
    if isinstance(dataset_or_len, IterableDataset):
        raise ConfigError(
            "ElasticSampler needs a map-style dataset (indexable, with __len__); an IterableDataset cannot be "
            "re-partitioned by index. See the 'Iterable datasets' section of ckptstore.elastic"
        )
    try:
        n = len(dataset_or_len)
    except TypeError:
        raise ConfigError(
            f"ElasticSampler takes a dataset with __len__ or its length as an int, got {type(dataset_or_len).__name__}"
        ) from None
    if not _is_int(n) or n < 0:
        raise ConfigError(f"ElasticSampler: len(dataset) must be an int >= 0, got {n!r}")
    return int(n)


def _default_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = False
    if num_replicas is None or rank is None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
    if not _is_int(num_replicas) or num_replicas < 1:
        raise ConfigError(f"ElasticSampler: num_replicas must be an int >= 1, got {num_replicas!r}")
    if not _is_int(rank) or not 0 <= rank < num_replicas:
        raise ConfigError(f"ElasticSampler: rank must be an int in [0, {num_replicas - 1}], got {rank!r}")
    return int(num_replicas), int(rank)


def _check_epoch(epoch: Any, what: str) -> int:
    if not _is_int(epoch) or not 0 <= epoch < _INT63:
        raise ConfigError(f"{what}: epoch must be an int in [0, 2**63), got {epoch!r}")
    return int(epoch)


def _check_seed(seed: Any, what: str) -> int:
    if not _is_int(seed) or not -_INT63 <= seed < _INT63:
        raise ConfigError(f"{what}: seed must be an int in [-2**63, 2**63), got {seed!r}")
    return int(seed)


class ElasticSampler(Sampler[int]):
    """A DistributedSampler whose position is a global cursor that restores at any world size.

    ``dataset_or_len``: a map-style dataset (or its length). ``num_replicas`` / ``rank`` default to the
    torch.distributed world when it is initialised, else 1 / 0. ``shuffle``, ``seed``, ``drop_last`` as for
    DistributedSampler (but ``drop_last=False`` never repeats samples: some ranks get one fewer).

    The training loop calls :meth:`advance` with the number of samples it consumed on this rank;
    :meth:`state_dict` / :meth:`load_state_dict` make the sampler a value ``mgr.save`` / ``mgr.restore``
    handle directly (saved once, replicated).

    Example::

        sampler = ElasticSampler(dataset, seed=0)
        mgr.restore({"model": model, "data": sampler})
        for batch in DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=2):
            ...
            sampler.advance(len(batch))
    """

    def __init__(
        self,
        dataset_or_len: Any,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.dataset_size = _dataset_size(dataset_or_len)
        self.num_replicas, self.rank = _default_world(num_replicas, rank)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ConfigError(f"ElasticSampler: {name} must be a bool, got {flag!r}")
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = _check_seed(seed, "ElasticSampler")
        self._epoch = 0
        self._start = 0  # global cursor at which the current pass starts
        self._taken = 0  # samples of the current pass this rank consumed (advance())
        self._yielded = 0  # indices the current pass's iterator has handed out
        self._iterated = False  # an iterator was created for the current pass
        self._restored = False  # the current position came from load_state_dict()
        self._generation = 0  # bumped whenever the pass changes; stale iterators check it
        self._perm_key: tuple[int, int, bool] | None = None
        self._perm: torch.Tensor | None = None
        self._perm_crc = 0

    # -- the position -----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.set_epoch(value)

    @property
    def cursor(self) -> int:
        """The global cursor: samples of this epoch consumed by all ranks together (or dropped)."""
        return global_cursor(
            self.dataset_size,
            self._start,
            self._taken,
            self.num_replicas,
            self.rank,
            drop_last=self.drop_last,
        )

    @property
    def consumed_this_pass(self) -> int:
        """Samples this rank consumed (``advance``) since the current pass started."""
        return self._taken

    @property
    def yielded(self) -> int:
        """Indices the current pass's iterator handed out (runs ahead of ``consumed_this_pass`` by the
        loader's prefetch)."""
        return self._yielded

    def _mine(self, start: int) -> int:
        return _share(self.dataset_size - start, self.num_replicas, self.rank, self.drop_last)

    def _next_start(self) -> int:
        """Where the next ``iter()`` starts (see the module docstring)."""
        if self._taken < self._mine(self._start):
            return self._start + self._taken * self.num_replicas
        if self._taken == 0 and not self._iterated:
            return self._start  # a fresh or restored pass in which this rank has nothing (left)
        return 0  # this rank consumed its whole share: iterating again replays the epoch

    def _new_pass(self, start: int) -> None:
        self._start, self._taken, self._yielded = start, 0, 0
        self._iterated = False
        self._generation += 1

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at cursor 0, unless it is the current epoch (then the position is kept)."""
        epoch = _check_epoch(epoch, "ElasticSampler.set_epoch")
        if epoch == self._epoch:
            return
        if self._restored and not self._iterated and 0 < self._start < self.dataset_size:
            log.warning(
                "ElasticSampler.set_epoch(%d) discards the restored position %d/%d of epoch %d",
                epoch,
                self._start,
                self.dataset_size,
                self._epoch,
            )
        self._epoch = epoch
        self._restored = False
        self._new_pass(0)

    def advance(self, n: int) -> None:
        """Record that training consumed ``n`` more samples on this rank (call it once per step with
        ``len(batch)``, after the step, before a save)."""
        if not _is_int(n) or n < 0:
            raise ConfigError(f"ElasticSampler.advance: n must be an int >= 0, got {n!r}")
        mine = self._mine(self._start)
        if self._taken + n > mine:
            raise ConfigError(
                f"ElasticSampler.advance({n}): rank {self.rank} has consumed {self._taken} of the {mine} samples "
                f"it has in this pass of epoch {self._epoch}. Pass the samples consumed on this rank "
                f"(len(batch), not the global batch), and set_epoch() before the next epoch"
            )
        if self._taken + n > self._yielded:
            raise ConfigError(
                f"ElasticSampler.advance({n}): rank {self.rank} would have consumed {self._taken + n} samples, but "
                f"the sampler yielded only {self._yielded} in this pass. Pass the samples consumed on this rank "
                "(len(batch), not the global batch), from a loader that iterates this sampler"
            )
        self._taken += n

    # -- iteration --------------------------------------------------------------------------------------------
    def _permutation(self) -> torch.Tensor:
        key = (self.seed, self._epoch, self.shuffle)
        if self._perm is None or self._perm_key != key:
            self._perm = _permutation(self.dataset_size, self.seed, self._epoch, self.shuffle)
            self._perm_key = key
            self._perm_crc = _order_crc(self._perm)
        return self._perm

    def _end(self, start: int) -> int:
        if not self.drop_last:
            return self.dataset_size
        return start + (self.dataset_size - start) // self.num_replicas * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        start = self._next_start()
        self._new_pass(start)
        self._iterated = True
        gen = self._generation
        perm = self._permutation()
        indices: list[int] = perm[start + self.rank : self._end(start) : self.num_replicas].tolist()
        return self._yield(indices, gen)

    def _yield(self, indices: list[int], gen: int) -> Iterator[int]:
        for i in indices:
            if self._generation != gen:
                raise ConfigError(
                    "ElasticSampler: the sampler was reset (load_state_dict, set_epoch or a new iter()) while an "
                    "older iterator over it was still in use; restore and set_epoch before iterating, and create "
                    "a new DataLoader iterator afterwards"
                )
            self._yielded += 1
            yield i

    def __len__(self) -> int:
        """Samples this rank gets in the current pass (from the cursor to the end of the epoch)."""
        return self._mine(self._start if self._iterated else self._next_start())

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global cursor, identical on every rank stepping in lockstep; JSON values only."""
        self._permutation()
        return {
            "epoch": self._epoch,
            "seed": self.seed,
            "consumed": self.cursor,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
            "order": self._perm_crc,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the saved epoch at the saved cursor, partitioned over this sampler's world size."""
        sd = state_dict
        if not isinstance(sd, Mapping):
            raise StateMismatchError(f"ElasticSampler state must be a dict, got {type(sd).__name__}")
        missing = [k for k in _STATE_KEYS if k not in sd]
        unexpected = sorted(str(k) for k in sd if k not in _STATE_KEYS)
        if missing or unexpected:
            raise StateMismatchError(
                f"ElasticSampler state: missing keys {missing}, unexpected keys {unexpected}; expected exactly "
                f"{list(_STATE_KEYS)} (a state_dict() of ElasticSampler)",
                missing=missing,
                unexpected=unexpected,
            )
        try:
            epoch = _check_epoch(sd["epoch"], "ElasticSampler state")
            seed = _check_seed(sd["seed"], "ElasticSampler state")
        except ConfigError as e:
            raise StateMismatchError(str(e)) from None
        size, shuffle, consumed, order = sd["dataset_size"], sd["shuffle"], sd["consumed"], sd["order"]
        if not _is_int(size) or size < 0:
            raise StateMismatchError(f"ElasticSampler state: dataset_size must be an int >= 0, got {size!r}")
        if size != self.dataset_size:
            raise StateMismatchError(
                f"ElasticSampler state was saved for a dataset of {size} samples, this one has "
                f"{self.dataset_size}: the saved cursor does not apply. Restore with the same dataset, or start "
                f"a new epoch (sampler.set_epoch({epoch + 1}) without loading the data state)"
            )
        if not isinstance(shuffle, bool):
            raise StateMismatchError(f"ElasticSampler state: shuffle must be a bool, got {shuffle!r}")
        if shuffle != self.shuffle:
            raise StateMismatchError(
                f"ElasticSampler state was saved with shuffle={shuffle}, this sampler has shuffle={self.shuffle}; "
                "create the sampler with the same shuffle to continue the epoch"
            )
        if not _is_int(consumed) or not 0 <= consumed <= size:
            raise StateMismatchError(f"ElasticSampler state: consumed must be an int in [0, {size}], got {consumed!r}")
        if not _is_int(order) or not 0 <= order <= 0xFFFFFFFF:
            raise StateMismatchError(f"ElasticSampler state: order must be a 32-bit crc, got {order!r}")
        perm = _permutation(size, seed, epoch, shuffle)
        crc = _order_crc(perm)
        if crc != order:
            raise StateMismatchError(
                f"ElasticSampler state: the permutation of epoch {epoch} (seed {seed}) computed here differs from "
                "the one the checkpoint was taken with (another torch version?); continuing would repeat and skip "
                f"samples. Use the torch version of the saving job, or start a new epoch "
                f"(sampler.set_epoch({epoch + 1}) without loading the data state)"
            )
        if seed != self.seed:
            log.info("ElasticSampler: seed %d from the checkpoint replaces %d", seed, self.seed)
        self.seed, self._epoch = seed, epoch
        self._perm, self._perm_key, self._perm_crc = perm, (seed, epoch, shuffle), crc
        self._restored = True
        self._new_pass(consumed)

    def __repr__(self) -> str:
        return (
            f"ElasticSampler(size={self.dataset_size}, rank={self.rank}/{self.num_replicas}, epoch={self._epoch}, "
            f"cursor={self.cursor}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )
