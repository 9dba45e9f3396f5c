"""Restore and load end to end: choose the candidates, run the walk's phases on every rank, fall back on damage.

A restore attempt of one candidate has two phases, each ending in one ``all_gather`` through
:meth:`ckptstore.dist.Comm.run_all` (every rank raises the same typed error when any rank failed): (1) every rank
plans its reads and checks the state fits (nothing changed yet, so a refusal on any rank leaves every rank's state
untouched); (2) every rank reads, verifies and only then changes its objects. ``load`` runs the same walk into
fresh tensors in the calling process.

Example::

    reader = Reader(tiers, comm, io, lineage)
    info, missing = reader.restore({"model": model}, "latest", map_location=None, strict=True, verify=None)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .._oserror import typed_os_error
from ..catalog import Lineage
from ..dist import Comm, LocalComm, same_error
from ..options import IOOptions
from ..tiers import Tiers
from ..transfer import generation_of
from ..types import CheckpointInfo
from . import walk
from .select import StepSpec, choose, first_good


class Reader:
    """Reads committed steps of ``tiers`` for one manager (its ranks, its options, its lineage)."""

    def __init__(self, tiers: Tiers, comm: Comm, io: IOOptions, lineage: Lineage) -> None:
        self.tiers = tiers
        self.comm = comm
        self.io = io
        self.lineage = lineage

    def _io(self, verify: bool | None) -> IOOptions:
        return self.io if verify is None or verify == self.io.verify else replace(self.io, verify=verify)

    def _read_error(self, e: BaseException, step: int, tier: str) -> BaseException:
        err = typed_os_error(e, f"step {step} could not be read from {self.tiers.get(tier).url}")
        if err is not e:
            err.__cause__ = e
        return err

    def _phase(self, what: str, fn: Any, step: int, tier: str) -> Any:
        def run() -> Any:
            try:
                return fn()
            except Exception as e:
                err = self._read_error(e, step, tier)
                if err is e:
                    raise
                raise err from e

        return self.comm.run_all(what, run, fail=same_error)

    def restore(
        self, state: Any, step: StepSpec, *, map_location: Any, strict: bool, verify: bool | None, trusted: bool
    ) -> CheckpointInfo:
        # "latest"/"best" is decided once, by rank 0: ranks listing the storage themselves could disagree while a
        # save commits. A failure to decide reaches every rank instead of leaving them waiting.
        cands = choose(step, self.tiers, self.comm)
        # Target memory that failed attempts already overwrote with unverified bytes: a fallback step must set
        # all of it again, or the state would mix two steps.
        dirty: dict[tuple[int, int], str] = {}
        io = self._io(verify)

        def attempt(s: int, tier: str) -> CheckpointInfo:
            cat = self.tiers.get(tier)
            with self.tiers.restoring(s):

                def plan() -> walk.ReadCtx:
                    m = cat.manifest(s, any_generation=isinstance(step, int))
                    return walk.plan_restore(
                        m,
                        state,
                        map_location=map_location,
                        strict=strict,
                        trusted=trusted,
                        storage=cat.storage,
                        rank=self.comm.rank,
                        world_size=self.comm.world_size,
                        dirty=dirty,
                    )

                rc = self._phase(f"restore plan of step {s}", plan, s, tier)
                self._phase(f"restore outcome of step {s}", lambda: walk.apply_restore(rc, io, self.comm), s, tier)
            m = rc.manifest
            gen = generation_of(m)
            self.lineage.restored_from(s, gen)
            if verify is not False and self.io.verify:
                cat.mark_verified(s, gen)
            return replace(cat.info_of(m), missing_per_rank=tuple(rc.missing_per_rank))

        return first_good(step, cands, attempt, tiers=self.tiers, threads=self.io.threads)

    def load(self, step: StepSpec, *, map_location: Any, verify: bool | None, trusted: bool) -> Any:
        # A load reads in this process alone (it may run on one rank only): the choice is this process's.
        cands = choose(step, self.tiers, LocalComm())
        io = self._io(verify)

        def attempt(s: int, tier: str) -> Any:
            cat = self.tiers.get(tier)
            try:
                m = cat.manifest(s, any_generation=isinstance(step, int))
                return walk.load(
                    m, map_location=map_location, trusted=trusted, storage=cat.storage, rank=self.comm.rank, io=io
                )
            except OSError as e:
                err = typed_os_error(e, f"step {s} could not be read from {cat.url}")
                if err is e:
                    raise
                raise err from e

        return first_good(step, cands, attempt, tiers=self.tiers, threads=self.io.threads)
