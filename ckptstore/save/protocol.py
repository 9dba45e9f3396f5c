"""The save protocol and the commit rule.

:class:`SaveProtocol` runs one save on every rank in three phases, each one call of a :mod:`ckptstore.dist`
phase helper (so a failure on any rank reaches every rank as one typed error naming the failed ranks):

1. *decide* (``Comm.gather_decide``): every rank sends the fingerprint of the layout it derived from its own
   boxes (:mod:`ckptstore.save.plans`); rank 0 lists the step's generations: a step in service is a
   ``CheckpointExistsError`` everywhere, else the generation to commit, the ``save_id``, the lineage parent, and
   whether every rank plans alone (all fingerprints equal). Rank 0 then writes the lease (:class:`Lease`).
2. *plan*: when the ranks agreed, each rank plans its own files, with no collective (and no planning at all
   when the structure is the previous save's). Otherwise (``Comm.gather_decide``) every rank sends its boxes;
   rank 0 refuses preparation errors and diverged replicas, else plans the writes (``plan.plan_writes``).
3. *write and commit* (``Comm.gather_decide``): every rank writes its files; rank 0 commits iff every rank
   succeeded (:class:`StepCommit`); the outcome reaches every rank.

Anything else: nothing is committed, the attempt's files are removed (:meth:`StepCommit.cleanup`), every rank
raises. After the commit, rank 0 queues the mirror upload and applies retention (:class:`ckptstore.tiers.Tiers`).

Example::

    res = SaveProtocol(tiers, comm, io, lineage).run(job)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .._oserror import typed_os_error
from .._version import __version__
from ..catalog import LEASE_REFRESH_SECONDS, Lineage, proc_start
from ..dist import Comm, rank_errors
from ..errors import CheckpointError, CheckpointExistsError, DistributedSaveError, ManifestError, StorageError
from ..format.compact import PartsFile, expand, layout_index, split_entries
from ..format.manifest import Manifest, Piece, TensorEntry, step_dir
from ..format.state import merge_per_rank, merge_trees, per_rank_values
from ..io import WrittenFile, write_files
from ..layout import LEASE_PREFIX, manifest_name
from ..options import IOOptions
from ..plan import FilePlan, LocalSpec, TensorLayout, WritePlan, diverged_replicas, plan_writes
from ..storage import Storage
from ..tiers import Tiers
from ..transfer import generation_of, step_files
from ..types import SaveResult
from .plans import CompactRows, LocalLayout, LocalPlans, Structure, agreed
from .prepare import SaveJob

log = logging.getLogger("ckptstore")


class Lease:
    """Marks a save in progress for ``gc`` in other processes: a small file in the step directory, rewritten every
    ``LEASE_REFRESH_SECONDS`` until the save ends. gc treats it as stale once it is ``LEASE_TTL_SECONDS`` old, or
    at once when it names a process of gc's own host that no longer runs (a killed save); see
    :meth:`ckptstore.catalog.Catalog.lease_live`."""

    def __init__(self, storage: Storage, prefix: str, save_id: str) -> None:
        self._storage = storage
        self.rel = f"{prefix}/{LEASE_PREFIX}{save_id}"
        pid = os.getpid()
        self._body = {"save_id": save_id, "host": platform.node(), "pid": pid, "start": proc_start(pid)}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Lease:
        """Write the lease (an ``OSError`` here fails the save: nothing of it is written yet) and keep it fresh."""
        # All or nothing (a kill mid-write must not leave a torn lease that gc cannot read and would respect for
        # its whole TTL), but never fsynced: a lease is a hint for gc, and a flush per save is not free (W2/W3).
        self._storage.write_hint(self.rel, self._payload())
        self._thread = threading.Thread(target=self._refresh, name="ckpt-lease", daemon=True)
        self._thread.start()
        return self

    def _payload(self) -> bytes:
        return json.dumps({**self._body, "heartbeat": time.time()}).encode()

    def _refresh(self) -> None:
        while not self._stopped.wait(LEASE_REFRESH_SECONDS):
            with self._lock:
                if self._stopped.is_set():
                    return
                try:
                    self._storage.write_hint(self.rel, self._payload())
                except OSError as e:
                    log.warning("could not refresh the in-progress marker %s: %s", self.rel, e)

    def stop(self) -> None:
        """Stop refreshing and remove the lease (once; later calls do nothing)."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._storage.remove(self.rel)
        except OSError as e:
            log.warning("could not remove the in-progress marker %s (gc removes it later): %s", self.rel, e)


class StepCommit:
    """The commit rule of one save attempt (Orbax's ``atomicity``): every file the manifest names is there with
    its size, then one ``create_exclusive`` of the manifest; "is that manifest mine?" decides an ambiguous answer;
    a failed attempt removes only its own files."""

    def __init__(self, storage: Storage, step: int, save_id: str, generation: int) -> None:
        self.storage = storage
        self.step = step
        self.save_id = save_id
        self.generation = generation
        self.prefix = step_dir(step)
        self.rel = f"{self.prefix}/{manifest_name(generation)}"
        self.committed = False

    def commit(self, m: Manifest) -> None:
        data = m.to_bytes()
        self.check_files(m.files)
        self.storage.sync_dir(self.prefix)
        try:
            self.storage.create_exclusive(self.rel, data)
        except FileExistsError:
            raise CheckpointExistsError(
                f"step {self.step} was committed by another writer while this save ran; this attempt is discarded",
                step=self.step,
            ) from None
        except OSError as e:
            # The outcome may be unknown (e.g. the answer to the S3 PUT was lost and the retries failed): if our
            # manifest is in place, the step IS committed and its data must not be cleaned up as a failed attempt.
            if self.own() is not True:
                raise
            log.warning("step %d: the commit reported %r, but its manifest is in place: committed", self.step, e)
        self.committed = True

    def check_files(self, files: Mapping[str, int]) -> None:
        """Every file the manifest names is there with its size (one listing), or nothing is committed: another
        process (a gc with too short a min-age, a cleanup script) may have removed finished shards meanwhile."""
        have = {e.name: e.size for e in self.storage.list_entries(self.prefix) if e.kind == "file"}
        bad = [f"{n} ({'missing' if n not in have else f'{have[n]} bytes, not {size}'})"
               for n, size in files.items() if have.get(n) != size]  # fmt: skip
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            err = StorageError(
                f"step {self.step} was not committed: files written by this save are gone or changed: {shown}. "
                f"Another process removed or rewrote them under {self.storage.url} while the save ran (a gc with a "
                "min-age shorter than the save?); save again"
            )
            err.errno = errno.ENOENT
            raise err

    def own(self) -> bool | None:
        """Whether the manifest in place is this attempt's (None: it cannot be told now)."""
        try:
            if not self.storage.exists(self.rel):
                return False
            return Manifest.from_bytes(self.storage.read_bytes(self.rel), where=self.rel).save_id == self.save_id
        except FileNotFoundError:
            return False
        except (OSError, EOFError, CheckpointError):
            return None

    def cleanup(self) -> None:
        """Rank 0: remove the files of this failed attempt — never those of a committed step or another writer."""
        own = self.own()
        if own is not False:
            # Committed after all (an ambiguous commit), or the storage cannot tell right now: leave the files;
            # gc removes them later if they turn out to be garbage.
            if own is None:
                log.warning("not cleaning up the failed save under %s: cannot tell whether it committed", self.prefix)
            return
        mine = f"shard-{self.save_id}-"  # the prefix of plan.shard_file_name(save_id, ...)
        try:
            for name in self.storage.list_dir(self.prefix):
                if name.startswith(mine) or name == f"{LEASE_PREFIX}{self.save_id}":
                    self.storage.remove(f"{self.prefix}/{name}")
            # Only an empty directory goes: another writer may be saving this step right now (list + remove_tree
            # would race with it and could delete files it just created, or even its committed step).
            self.storage.remove_dir(self.prefix)
        except OSError as e:
            log.warning("could not clean up the failed attempt under %s: %s", self.prefix, e)


@dataclass(frozen=True)
class Attempt:
    """Rank 0's decision at the start of a save, known to every rank."""

    exists: bool
    generation: int
    save_id: str
    parent: tuple[int, int] | None
    local: bool = False
    """Every rank derived the same layout from its own boxes: each plans its own files, nothing is gathered."""


@dataclass
class _Run:
    """One attempt on this rank: what the later phases and the cleanup need."""

    job: SaveJob
    attempt: Attempt
    commit: StepCommit
    lease: Lease | None = None
    lease_error: OSError | None = None
    mine: LocalLayout | None = None
    """This rank's layout, derived from its own boxes (None: irregular, or not prepared)."""
    all_specs: list[Any] | None = None
    """Rank 0, when the plan was gathered: every rank's specs."""


class SaveProtocol:
    """Runs saves of one manager: its primary catalog (through ``tiers``), ranks, options and lineage."""

    def __init__(self, tiers: Tiers, comm: Comm, io: IOOptions, lineage: Lineage) -> None:
        self.tiers = tiers
        self.comm = comm
        self.io = io
        self.lineage = lineage
        self.plans = LocalPlans()

    @property
    def storage(self) -> Storage:
        return self.tiers.primary.storage

    def run(self, job: SaveJob) -> SaveResult:
        mine = self._derive(job)
        attempt = self._decide(job, mine)
        run = _Run(job, attempt, StepCommit(self.storage, job.step, attempt.save_id, attempt.generation), mine=mine)
        try:
            try:
                self._start_lease(run)
                plan = self._plan(run)
                nbytes, nfiles = self._write_and_commit(run, plan)
            finally:
                if run.lease is not None:
                    run.lease.stop()  # whatever happened: never leave a lease refreshed by a thread forever
        except BaseException as e:
            # A rank failed, a collective failed (a rank died or is stuck), or the plan was refused: nothing is
            # committed and the files of this attempt go now rather than at the next gc. A committed step is
            # never cleaned up. The caller gets a typed error that is still an OSError where it was one.
            if not run.commit.committed and self.comm.rank == 0:
                run.commit.cleanup()
            typed = typed_os_error(e, f"step {job.step} was not saved (nothing was committed)")
            if typed is e:
                raise
            raise typed from e
        return self._result(job, nbytes, nfiles)

    # -- phase 1 ----------------------------------------------------------------------------------------------
    def _derive(self, job: SaveJob) -> LocalLayout | None:
        if job.prep_error is not None:
            return None  # the plan phase gathers, and reports this rank's error to every rank
        try:
            return self.plans.derive(job.specs, job.tree, rank=self.comm.rank, world=self.comm.world_size)
        except Exception as e:  # never fatal here: the gathered plan phase refuses what is wrong, naming ranks
            log.debug("step %d: no local layout (%r); the plan is gathered", job.step, e)
            return None

    def _decide(self, job: SaveJob, mine: LocalLayout | None) -> Attempt:
        def structure() -> Structure:
            return mine.structure if mine is not None else Structure(None, "")

        def decide(structures: list[Structure]) -> Attempt:
            try:
                self.storage.check_commit_support()  # refuse before any rank uploads a byte
                parent = self.lineage.parent_for(job.step, self.tiers)
                # A step number whose generations are all quarantined (failed verification, or superseded by a
                # run resumed from an older step) is saved again as the next generation.
                files = step_files(self.storage, job.step)
            except OSError as e:
                raise _check_error(e, f"step {job.step} was not saved: cannot check {self.storage.url}") from e
            local = agreed(structures)
            return Attempt(files.visible is not None, files.next_generation, uuid.uuid4().hex[:8], parent, local)

        what = f"start of the save of step {job.step}"
        fail = rank_errors(f"step {job.step} was not saved")
        attempt = self.comm.gather_decide(what, structure, decide, fail=fail)
        if attempt.exists:
            raise CheckpointExistsError(
                f"step {job.step} is already committed under {self.storage.url}; steps are immutable — save under a "
                "new step number or delete it first",
                step=job.step,
            )
        return attempt

    def _start_lease(self, run: _Run) -> None:
        # Other processes' gc must see this save as in progress however long it takes (a slow rank, a long
        # collective timeout): rank 0 keeps a lease file in the step directory fresh until the end.
        if self.comm.rank != 0:
            return
        run.lease = Lease(self.storage, run.commit.prefix, run.attempt.save_id)
        try:
            run.lease.start()
        except OSError as e:  # disk full, no permission: this save cannot succeed; every rank learns it
            if not self.comm.is_distributed:
                raise
            run.lease_error = e  # reported as this rank's write failure

    # -- phase 2 ----------------------------------------------------------------------------------------------
    def _plan(self, run: _Run) -> list[FilePlan]:
        job = run.job
        if run.attempt.local:
            assert run.mine is not None
            return self.plans.files(run.mine, self._plan_options(), save_id=run.attempt.save_id, rank=self.comm.rank)

        def local() -> list[LocalSpec]:
            if job.prep_error is not None:
                raise job.prep_error  # this rank could not prepare its state
            return job.specs

        def coordinate(all_specs: list[Any]) -> WritePlan:
            run.all_specs = all_specs
            problem = replica_problems(job.step, all_specs)
            if problem is not None:
                raise problem
            return plan_writes(all_specs, save_id=run.attempt.save_id, options=self._plan_options())

        fail = rank_errors(f"step {job.step} was not saved: preparing the state", own_first=True)
        plan = self.comm.gather_decide(f"the write plan for step {job.step}", local, coordinate, fail=fail)
        return plan.for_rank(self.comm.rank)

    def _plan_options(self) -> IOOptions:
        """``self.io``, with shard files no bigger than the storage prefers (S3: one PutObject each)."""
        cap = self.storage.preferred_file_bytes
        if cap is None or cap >= self.io.file_bytes:
            return self.io
        return replace(self.io, file_bytes=cap)

    # -- phase 3 ----------------------------------------------------------------------------------------------
    def _write_and_commit(self, run: _Run, mine: list[FilePlan]) -> tuple[int, int]:
        job = run.job
        own = run.mine.own if run.attempt.local and run.mine is not None else ()

        def local() -> _Report:
            try:
                if run.lease_error is not None:
                    raise run.lease_error
                written = write_files(self.storage, run.commit.prefix, mine, job.sources, self.io)
                if not run.attempt.local:
                    return written, job.tree, own, []
                written, parts = self.plans.rows.parts_files(mine, written)
                # Rank 0 uses its own tree; the others add only their PerRank values to it (the same structure:
                # the fingerprints agreed). Nothing sends the whole tree: gather_object pads every message to
                # the largest, so one big report would cost world x its size.
                tree = None if self.comm.rank == 0 else per_rank_values(job.tree)
                return written, tree, own, parts
            except Exception as e:
                if self.comm.is_distributed:
                    log.error("rank %d failed writing step %d: %r", self.comm.rank, job.step, e)
                raise

        def coordinate(reports: list[_Report]) -> tuple[int, int]:
            rows = self.plans.rows if run.attempt.local else None
            m = build_manifest(job, self._spec_of(run, reports), reports, run.attempt, self.comm.world_size, rows)
            run.commit.commit(m)
            self.tiers.primary.remember(m)
            self.lineage.saved(job.step, generation_of(m))
            return m.nbytes, len(m.files)

        fail = rank_errors(f"step {job.step} was not committed", "; the previous steps are untouched")
        try:
            return self.comm.gather_decide(f"the commit outcome for step {job.step}", local, coordinate, fail=fail)
        except DistributedSaveError as e:
            if run.commit.committed:
                raise DistributedSaveError(
                    f"step {job.step} IS committed (its manifest is written), but telling the other ranks failed: {e}",
                    failed_ranks=e.failed_ranks,
                ) from e
            raise

    @staticmethod
    def _spec_of(run: _Run, reports: Sequence[_Report]) -> dict[str, _Meta]:
        """Rank 0: every tensor's dtype, shape, order, device and encoding, from the layout (and the ranks'
        ``PerRank`` tensors) or from the gathered specs."""
        spec_of: dict[str, _Meta] = {}
        if run.attempt.local:
            assert run.mine is not None
            for t in run.mine.layout.tensors:
                spec_of[t.key] = t
            for r in reports:
                for sp in r[2]:
                    spec_of.setdefault(sp.key, sp)
            return spec_of
        assert run.all_specs is not None
        for specs in run.all_specs:
            for sp in specs:
                spec_of.setdefault(sp.key, sp)
        return spec_of

    def _result(self, job: SaveJob, nbytes: int, nfiles: int) -> SaveResult:
        seconds = time.perf_counter() - job.t0
        deleted = self.tiers.after_commit(job.step) if self.comm.rank == 0 else ()
        waited = job.copy.waited if job.copy is not None else 0.0
        res = SaveResult(
            step=job.step,
            url=self.storage.url_of(step_dir(job.step)),
            nbytes=nbytes,
            files=nfiles,
            seconds=seconds,
            blocking_seconds=seconds if job.blocking_seconds is None else job.blocking_seconds + waited,
            staging_wait_seconds=waited,
            deleted_steps=deleted,
        )
        log.info(
            "saved step %d: %.1f MiB in %d files, %.2fs (%.2f GB/s) -> %s",
            job.step,
            res.nbytes / 2**20,
            res.files,
            seconds,
            res.nbytes / 1e9 / max(seconds, 1e-9),
            res.url,
        )
        return res


def _check_error(e: OSError, what: str) -> BaseException:
    """The error of a failed check at the start of a save: a storage-typed error keeps its class and errno."""
    if isinstance(e, StorageError):
        err = type(e)(f"{what}: {e}")
        err.errno, err.strerror, err.filename = e.errno, e.strerror, e.filename
        return err
    return typed_os_error(e, what)


_Report = tuple[list[WrittenFile], Any, tuple[LocalSpec, ...], list[PartsFile]]
"""What a rank reports after writing: its written files (pieces, except in its files of compact parts), its
state tree (with per-rank plans, only rank 0's; the others send their ``PerRank`` values), its ``PerRank`` specs
(per-rank plans) and its files of compact parts as layout lines."""

_Meta = LocalSpec | TensorLayout
"""What the manifest says of a tensor besides its pieces (``order``, ``dtype``, ``global_shape``, ``device``,
``encoding``)."""


def build_manifest(
    job: SaveJob,
    spec_of: Mapping[str, _Meta],
    reports: Sequence[_Report],
    attempt: Attempt,
    world_size: int,
    rows: CompactRows | None = None,
) -> Manifest:
    """Rank 0: the manifest of a save from every tensor's metadata and every rank's written files (pieces sorted
    by box). With per-rank plans, the compact rows ``rows`` come as the ranks' layout lines: they become the
    reader's lazy rows after the reader's own check, or explicit pieces when it refuses them."""
    pieces: dict[str, list[Piece]] = {}
    files: dict[str, int] = {}
    for written, *_ in reports:
        for wf in written:
            files[wf.name] = wf.size
            for key, p in wf.pieces:
                pieces.setdefault(key, []).append(p)
    split = _compact_entries(job.step, spec_of, [pf for r in reports for pf in r[3]], files, pieces, rows)
    entries: dict[str, TensorEntry] = {}
    for key in sorted(spec_of, key=lambda k: (spec_of[k].order, k)):
        sp = spec_of[key]
        if key in split:
            entries[key] = split[key]
            continue
        ps = sorted(pieces.get(key, []), key=lambda p: (p.offsets or (), p.file, p.start))
        entries[key] = TensorEntry(sp.dtype, sp.global_shape, tuple(ps), sp.device, sp.encoding)
    parent = None if attempt.parent is None else {"step": attempt.parent[0], "generation": attempt.parent[1]}
    return Manifest(
        step=job.step,
        tree=merge_per_rank(job.tree, [r[1] for r in reports[1:]])
        if attempt.local
        else merge_trees([r[1] for r in reports]),
        tensors=entries,
        files=files,
        epoch=job.epoch,
        metrics=job.metrics,
        metadata=job.metadata,
        created_at=job.created_at,
        world_size=world_size,
        save_id=attempt.save_id,
        versions={"ckptstore": __version__, "torch": torch.__version__, "python": platform.python_version()},
        extras={"lineage": {"generation": attempt.generation, "parent": parent}},
    )


def _compact_entries(
    step: int,
    spec_of: Mapping[str, _Meta],
    parts: Sequence[PartsFile],
    files: Mapping[str, int],
    pieces: dict[str, list[Piece]],
    rows: CompactRows | None,
) -> dict[str, TensorEntry]:
    """The compact rows assembled from the ranks' lines (``{}`` without any); when the reader's index refuses
    them, their explicit pieces go into ``pieces`` instead."""
    if rows is None or not parts:
        return {}
    shapes = [(spec_of[k].global_shape, c, spec_of[k].itemsize) for k, c, _ in rows.keys]
    parts = sorted(parts, key=lambda f: (f.first, f.part))  # the order the encoder lists files of explicit rows
    try:
        ix = layout_index(shapes, parts, files, f"the manifest of step {step}")
    except ManifestError as e:
        log.warning("step %d: the ranks' compact rows do not form a layout a reader accepts (%s); writing them "
                    "explicitly", step, e)  # fmt: skip
        for row, ps in expand(shapes, parts).items():
            pieces.setdefault(rows.keys[row][0], []).extend(ps)
        return {}
    metas = [(spec_of[k].dtype, spec_of[k].device) for k, _, _ in rows.keys]
    return {k: e for (k, _, _), e in zip(rows.keys, split_entries(ix, shapes, metas))}


def replica_problems(step: int, all_specs: Sequence[Sequence[LocalSpec]]) -> DistributedSaveError | None:
    """The error naming keys and ranks when ranks hold different values for a tensor that would be written once."""
    bad = diverged_replicas(all_specs)
    if not bad:
        return None
    failed: dict[int, str] = {}
    lines = []
    for key, by in list(bad.items())[:5]:
        groups = sorted(by.values(), key=lambda rs: (-len(rs), rs))  # the largest group first (ties: rank 0's)
        lines.append(f"{key!r}: " + " vs ".join("ranks " + ",".join(map(str, rs)) for rs in groups))
        for rs in groups[1:]:
            for r in rs:
                failed.setdefault(r, f"holds a different value of replicated tensor {key!r}")
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return DistributedSaveError(
        f"cannot save step {step}: tensors saved as replicas (the same key and shape on every rank, "
        f"written once) differ between ranks: {'; '.join(lines)}{more}. Values that differ per rank on purpose (a "
        "ZeRO optimizer shard, a rank-local counter or EMA) must be wrapped in ckptstore.PerRank(...) or saved as "
        "DTensor shards; otherwise the replicas have diverged (check the gradient synchronisation). "
        "io.verify_replicas='off' skips this check",
        failed_ranks=failed,
    )
