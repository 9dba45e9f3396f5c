"""CheckpointManager: the public entry point (save, restore, load, list, delete).

The manager validates arguments, delegates and returns; the work is done by its collaborators (see
``docs/DESIGN.md``, "Where each responsibility lives"): :class:`~ckptstore.catalog.Catalog` (one per tier) and
:class:`~ckptstore.tiers.Tiers` for what is committed, :mod:`ckptstore.save` for writing a step,
:mod:`ckptstore.restore` for reading one back.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ._gcpause import gc_paused
from ._oserror import reraise_typed
from .catalog import Catalog, Lineage, check_step
from .dist import Comm, make_comm
from .errors import CheckpointError, ConfigError, UnsupportedValueError
from .format.manifest import MAX_INT64, Manifest, encode_json
from .options import IOOptions
from .restore.reader import Reader
from .restore.select import StepSpec
from .retention import coerce_retention
from .save.background import Background, PendingSave
from .save.prepare import Preparer, SaveJob
from .save.protocol import SaveProtocol
from .storage import Storage, open_storage
from .tiers import Tiers
from .types import CheckpointInfo, SaveResult

__all__ = ["CheckpointManager", "PendingSave", "StepSpec"]

log = logging.getLogger("ckptstore")


class CheckpointManager:
    """Save and restore training state under one root URL; one directory (prefix) per step.

    ``root`` is a local path, ``file://``, ``memory://``, ``s3://bucket/prefix`` or any fsspec URL;
    ``storage_options`` goes to fsspec unchanged. In a torch.distributed job every rank creates the manager
    and calls ``save``/``restore`` with the same arguments.

    Example::

        mgr = CheckpointManager("./checkpoints", retention={"keep_last": 3})
        mgr.save(100, {"model": model, "optim": optimizer}, epoch=2, metrics={"loss": 0.41})
        info = mgr.restore({"model": model, "optim": optimizer})   # newest verified step, in place
        print(info.step, info.epoch, info.metrics["loss"])

    Besides ``storage``, ``mirror_storage``, ``comm``, ``io`` and ``url``, the manager exposes its collaborators
    for tools and tests: ``catalog`` (the primary tier's :class:`~ckptstore.catalog.Catalog`), ``preparer``
    (:class:`~ckptstore.save.prepare.Preparer`, with the staging buffers) and ``protocol``
    (:class:`~ckptstore.save.protocol.SaveProtocol`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        retention: Any = None,
        io: IOOptions | dict[str, Any] | None = None,
        allow_pickle: bool = False,
        async_save: bool = False,
        overlap_staging: bool = False,
        mirror: str | os.PathLike[str] | None = None,
        mirror_storage_options: dict[str, Any] | None = None,
        distributed: bool | None = None,
        comm: Comm | None = None,
    ) -> None:
        """The keyword options are the fields of :class:`ckptstore.config.ManagerConfig` (documented in
        ``configs/README.md``, where ``timeout_seconds`` is a config shorthand for ``io.timeout_seconds``),
        plus ``comm``, the collectives to use (default: torch.distributed when initialised, else one process).
        ``CheckpointManager(cfg.root, **cfg.to_kwargs())`` builds the manager a config describes.
        """
        self.io = io if isinstance(io, IOOptions) else IOOptions.from_dict(io)
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root).strip():
            # "" would silently be the current directory: say "." for that.
            raise ConfigError(f"root must be a non-empty path or URL (use '.' for the current directory), got {root!r}")
        storage = open_storage(os.fspath(root), storage_options, io=self.io)
        self.url = storage.url
        self.allow_pickle = allow_pickle
        self.async_save = async_save
        if not isinstance(overlap_staging, bool):
            raise ConfigError(f"overlap_staging must be True or False, got {overlap_staging!r}")
        self.overlap_staging = overlap_staging
        self.retention = coerce_retention(retention)
        self.comm = comm = make_comm(
            comm, distributed, self.io.timeout_seconds
        )  # no collective yet: created at the first save
        # Tiered storage: commit on the (fast, local) primary, then copy each committed step to the mirror in
        # the background; restore takes the newest verified step of either tier.
        mirror_st = open_storage(os.fspath(mirror), mirror_storage_options, io=self.io) if mirror is not None else None
        if mirror_st is not None and mirror_st.url == storage.url:
            raise ConfigError(f"mirror {mirror_st.url} is the same location as the root")
        self.catalog = Catalog(storage, "primary", rank=comm.rank)
        mirror_cat = Catalog(mirror_st, "mirror", rank=comm.rank) if mirror_st is not None else None
        self._tiers = Tiers(self.catalog, mirror_cat, threads=self.io.threads, retention=self.retention)
        self._lineage = Lineage()
        self.preparer = Preparer(self.io, comm.is_distributed)
        self.protocol = SaveProtocol(self._tiers, comm, self.io, self._lineage)
        self._reader = Reader(self._tiers, comm, self.io, self._lineage)
        self._background = Background(self.io.background_nice)
        self._closed = False
        self._pid = os.getpid()

    # -- construction helpers ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, source: str | os.PathLike[str] | dict[str, Any], **overrides: Any) -> CheckpointManager:
        """Build a manager from a YAML file or a dict (see ``configs/README.md``).

        Exactly ``cls(cfg.root, **cfg.to_kwargs())`` for ``cfg = ckptstore.config.load_config(source)``;
        ``overrides`` are constructor keyword arguments that replace the config's (e.g. ``comm=``).

        Example::

            mgr = CheckpointManager.from_config("configs/local.yaml")
        """
        from .config import load_config

        cfg = load_config(source)
        return cls(cfg.root, **{**cfg.to_kwargs(), **overrides})

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.url!r})"

    # The storages are the catalogs' (every collaborator reads them from there): replacing one (a test wrapping it
    # in a fault injector, a tool adding instrumentation) takes effect everywhere.
    @property
    def storage(self) -> Storage:
        return self.catalog.storage

    @storage.setter
    def storage(self, st: Storage) -> None:
        self.catalog.storage = st

    @property
    def mirror_storage(self) -> Storage | None:
        return self._tiers.mirror.storage if self._tiers.mirror is not None else None

    @mirror_storage.setter
    def mirror_storage(self, st: Storage) -> None:
        if self._tiers.mirror is None:
            raise ConfigError(f"{self!r} has no mirror tier")
        self._tiers.mirror.storage = st

    # -- listing --------------------------------------------------------------------------------------------
    @property
    def tiers(self) -> list[str]:
        """``["primary"]``, plus ``"mirror"`` for a tiered manager."""
        return self._tiers.names

    def steps(self, tier: Literal["primary", "mirror", "all"] = "primary") -> list[int]:
        """Committed steps (those with a manifest), ascending as integers; ``tier="all"`` merges both tiers."""
        return self._tiers.steps(tier)

    def info(self, step: int) -> CheckpointInfo:
        """Metadata of a committed step (``CheckpointNotFoundError`` if there is none)."""
        return self.catalog.info(check_step(step))

    def manifest(self, step: int) -> Manifest:
        """The parsed manifest of a committed step (read-only use)."""
        return self.catalog.manifest(check_step(step), any_generation=True)

    def history(
        self, tier: Literal["primary", "mirror"] = "primary", *, include_quarantined: bool = False
    ) -> list[CheckpointInfo]:
        """Every committed step's info (step, epoch, metrics, bytes, created_at, generation, parent), ascending;
        unreadable manifests are skipped with a warning. ``include_quarantined``: every generation of every step,
        quarantined ones too (``info.quarantined`` says why) — the lineage ``ckptstore ls --all`` shows."""
        return self._tiers.get(tier).history(include_quarantined=include_quarantined)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return self.info(steps[-1]) if steps else None

    def best(self, metric: str = "loss", mode: Literal["min", "max"] = "min") -> CheckpointInfo | None:
        """The committed step with the best ``metric`` (``mode="min"``: lowest), or None if no step has one.

        Ranked by :func:`ckptstore.retention.rank_by_metric`, the ranking ``KeepBest`` uses: only finite numbers
        count (a missing, non-numeric, NaN or ±inf metric never wins, not even ``-inf`` under ``"min"``), ints
        compare exactly however large, and on a tie the newer step wins. Raises ``ConfigError`` for a
        ``mode`` other than ``"min"``/``"max"``.

        Example::

            mgr.best("accuracy", "max").step
        """
        return self.catalog.best(metric, mode)

    # -- pins -----------------------------------------------------------------------------------------------
    def pin(self, step: int) -> None:
        """Protect a committed step from retention (stored under the root, survives restarts)."""
        self.catalog.pin(check_step(step))

    def unpin(self, step: int) -> None:
        self.catalog.unpin(check_step(step))

    def pinned(self) -> list[int]:
        return self.catalog.pinned()

    # -- save -------------------------------------------------------------------------------------------------
    @gc_paused
    def save(
        self,
        step: int,
        state: Mapping[str, Any] | Any,
        *,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        blocking: bool | None = None,
        allow_pickle: bool | None = None,
    ) -> SaveResult | PendingSave:
        """Save ``state`` as ``step``; the manifest is written last, once, as the commit.

        ``state`` may nest dicts/lists/tuples of tensors (plain or DTensor), objects with
        ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers, GradScaler), JSON values
        (incl. inf/nan) and :class:`PerRank` markers. Anything else needs ``allow_pickle=True``.
        Raises ``CheckpointExistsError`` if the step is already committed.

        With ``blocking=False`` the state is first copied to staging memory (so training may change it right
        away) and the write, commit and retention run in the background; a :class:`PendingSave` is returned.
        With ``overlap_staging=True`` (manager option) that copy runs in the background as well, and optimizer
        steps wait for it (see :mod:`ckptstore.overlap`).
        """
        self._check_open()
        step = check_step(step)
        blocking = not self.async_save if blocking is None else blocking
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or abs(epoch) > MAX_INT64):
            raise UnsupportedValueError(f"epoch must be an int (64-bit) or None, got {epoch!r}")
        metrics, metadata = dict(metrics or {}), dict(metadata or {})
        encode_json(metrics, "metrics")  # fail fast, before any byte is written
        encode_json(metadata, "metadata")
        self.wait()  # at most one save in flight; re-raises a failed background save
        self.comm.ensure()  # a group is created here, on the caller's thread, never by the background save
        job = SaveJob.new(step, epoch=epoch, metrics=metrics, metadata=metadata)
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        blocking, ov = self.preparer.prepare(
            job, state, rank=self.comm.rank, allow_pickle=pickle_ok, blocking=blocking, overlapped=self.overlap_staging
        )
        if ov is not None:
            finish = functools.partial(self.preparer.overlap_finish, job, ov)
            return self._background.overlapped(job, finish, self.protocol.run, distributed=self.comm.is_distributed)
        if blocking:
            return self.protocol.run(job)
        return self._background.submit(job, self.protocol.run)

    def delete(self, step: int, *, tier: Literal["primary", "mirror"] = "primary") -> None:
        """Delete a committed step: its manifest first (the step disappears atomically), then its data.

        Raises ``CheckpointNotFoundError`` if there is no such step, and ``StorageError`` (still the storage's
        ``OSError`` subclass, e.g. ``PermissionError``) when the storage refuses."""
        step = check_step(step)
        cat = self._tiers.get(tier)
        try:
            cat.delete(step)
        except OSError as e:
            reraise_typed(e, f"step {step} could not be (fully) deleted from {cat.url}; check the permissions")

    def gc(self, *, min_age_seconds: float = 600.0) -> list[str]:
        """Remove partial steps (no manifest) and unreferenced files inside committed steps.

        Only files older than ``min_age_seconds`` are touched, and a step directory whose running save keeps its
        lease fresh (``.saving-<id>``, refreshed every 30 s) is not touched at all, however long the save takes.
        Symbolic links, FIFOs and other entries that are not real directories/files are never followed or
        removed (a warning names them). Returns the removed paths (relative to the root).
        """
        return self.catalog.gc(min_age_seconds=min_age_seconds)

    def flush_mirror(self, timeout: float | None = None) -> list[int]:
        """Wait until every committed step queued for the mirror is copied; returns those steps.

        Uploads that failed are tried once more. If some still fail, raises
        :class:`StorageError` naming them (they stay on the primary tier, protected from its retention, and are
        retried at the next save, ``flush_mirror()`` or ``close()``).
        """
        if self._pid != os.getpid():
            self._after_fork(refuse=False)
        return self._tiers.flush_mirror(timeout, rank=self.comm.rank)

    # -- restore / load ---------------------------------------------------------------------------------------------
    @gc_paused
    def restore(
        self,
        state: Mapping[str, Any] | Any,
        *,
        step: StepSpec = "latest",
        map_location: Any = None,
        strict: bool = True,
        verify: bool | None = None,
        trusted: bool = False,
    ) -> CheckpointInfo:
        """Put a committed step back into ``state`` in place and return its info.

        Tensors are read straight into the existing tensors' storage; modules, optimizers and other
        ``Stateful`` objects get ``load_state_dict``; dicts/lists are updated in place. ``step`` is an int,
        ``"latest"`` (the newest step that verifies — a corrupt newest step is skipped with a warning) or
        ``"best"``. With ``strict`` (default) keys missing from the checkpoint or (for modules) unexpected keys
        raise :class:`StateMismatchError`.

        Example::

            info = mgr.restore({"model": model, "optim": optimizer})
            start_epoch = info.epoch + 1
        """
        self._check_open()
        self.wait()
        return self._reader.restore(
            state, step, map_location=map_location, strict=strict, verify=verify, trusted=trusted
        )

    @gc_paused
    def load(
        self,
        step: StepSpec = "latest",
        *,
        map_location: Any = None,
        verify: bool | None = None,
        trusted: bool = False,
    ) -> Any:
        """Read a committed step into fresh objects: the saved nested structure with new tensors.

        Objects that were saved through ``state_dict()`` come back as their state dicts; a step saved by
        several ranks comes back consolidated (full tensors). ``map_location`` has ``torch.load``'s meanings
        (also ``"meta"`` for shapes only) plus a callable ``fn(key, tensor) -> device``.

        Example::

            sd = mgr.load(step=1200, map_location="cpu")
            model.load_state_dict(sd["model"])
        """
        self._check_open()
        self.wait()
        return self._reader.load(step, map_location=map_location, verify=verify, trusted=trusted)

    # -- async & lifecycle -------------------------------------------------------------------------------------
    def on_preemption(
        self,
        signals: Sequence[int] | None = None,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
    ) -> Any:
        """A :class:`~ckptstore.schedule.SaveSchedule` on this manager's ranks: the signals (default SIGTERM and
        SIGUSR1) only set a flag, and ``should_save(step)`` agrees across ranks at the next step boundary.

        Example::

            schedule = mgr.on_preemption(every_steps=500)
            for step in range(start, total):
                train_step()
                if schedule.should_save(step + 1):
                    mgr.save(step + 1, state)
                if schedule.preempted:
                    break
        """
        from .schedule import DEFAULT_SIGNALS, SaveSchedule

        return SaveSchedule(
            every_steps=every_steps,
            every_seconds=every_seconds,
            signals=DEFAULT_SIGNALS if signals is None else tuple(signals),
            # Its own group: should_save() runs on the training thread while a background save may be running
            # collectives on this manager's group.
            comm=self.comm.sibling(),
        )

    def wait(self) -> SaveResult | None:
        """Block until the pending background save (if any) finished; re-raise its error."""
        if self._pid != os.getpid():
            self._after_fork(refuse=False)
        return self._background.wait()

    def close(self) -> None:
        """Wait for a pending save, then release resources. Safe to call twice."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._after_fork(refuse=False)
        try:
            self.wait()
            self.flush_mirror()  # the last checkpoint should reach the remote tier before the job ends
        finally:
            self._closed = True
            self._background.close()
            self._tiers.close()
            self.storage.close()
            if self.mirror_storage is not None:
                self.mirror_storage.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed")
        if self._pid != os.getpid():
            self._after_fork()

    def _after_fork(self, *, refuse: bool = True) -> None:
        """First use in a forked child: the parent's threads (background save, mirror uploads, staging copies) do
        not exist here, so nothing of theirs may be waited for. A distributed manager is refused: its process
        group belongs to the parent."""
        if refuse and self.comm.is_distributed:
            raise ConfigError(
                f"{self!r} was created in process {self._pid} and is used in forked child {os.getpid()}; its "
                "process group belongs to the parent. Create a new CheckpointManager in the child (without the "
                "parent's process group) instead"
            )
        log.debug("%r: first use in forked child %d; dropping the parent's background work", self, os.getpid())
        self._pid = os.getpid()
        self._background.after_fork()
        self._tiers.after_fork()
        self._lineage.after_fork()
        self.preparer.after_fork()

    # -- inference artifacts (ckptstore.artifacts) ---------------------------------------------------------------
    def save_artifact(self, step: int, name: str, obj: Any) -> Any:
        """Store a ``torch.export.ExportedProgram`` or TorchScript module as artifact ``name`` of committed ``step``.

        Stored beside the (immutable) manifest as ``artifact-<name>.pt2``/``.ts`` plus a JSON sidecar written last.
        Only rank 0 writes (other ranks return None). Returns an :class:`ckptstore.artifacts.ArtifactInfo`.

        Example::

            mgr.save_artifact(1200, "serving", torch.export.export(model.eval(), (x,)))
        """
        from .artifacts import save_artifact

        self._check_open()
        self.wait()
        step = check_step(step)
        if self.comm.rank != 0:
            return None
        return save_artifact(self.storage, step, name, obj)

    def load_artifact(self, step: int, name: str, *, map_location: Any = None) -> Any:
        """Load artifact ``name`` of ``step`` (size and crc32c checked first) — no model class needed.

        Artifacts are loaded only when asked for: ``torch.jit.load`` runs TorchScript code and
        ``torch.export.load`` rebuilds an operator graph; load artifacts you trust to run.

        Example::

            program = mgr.load_artifact(1200, "serving")
            y = program.module()(x)
        """
        from .artifacts import load_artifact

        self._check_open()
        return load_artifact(self.storage, check_step(step), name, map_location=map_location)

    def artifacts(self, step: int) -> list[Any]:
        """The artifacts stored with committed ``step`` (``ArtifactInfo`` objects, by name)."""
        from .artifacts import list_artifacts

        step = check_step(step)
        self.catalog.manifest(step)
        return list_artifacts(self.storage, step)
