"""CheckpointManager: the public entry point (save, restore, load, list, delete)."""

from __future__ import annotations

import errno
import io as _pyio
import json
import logging
import math
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from . import overlap
from ._version import __version__
from .dist import Comm, LocalComm, default_comm
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    DistributedSaveError,
    IntegrityError,
    ManifestError,
    StateChangedError,
    StateMismatchError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .format.manifest import (
    MANIFEST_NAME,
    MAX_INT64,
    MAX_STEP,
    Manifest,
    Piece,
    TensorEntry,
    dtype_name,
    encode_json,
    parse_step_dir,
    step_dir,
)
from .format.state import PerRank, flatten, is_stateful, unflatten
from .io import (
    ReadTask,
    Source,
    _parallel,
    plan_fill,
    read_pieces,
    sample_crc,
    tensor_bytes,
    verify_views,
    write_files,
)
from .layout import StepFiles, manifest_name, parse_manifest_name, parse_quarantine_name, quarantine_name
from .options import IOOptions
from .plan import LocalSpec, WritePlan, diverged_replicas, plan_writes
from .staging import StagingPool
from .storage import Storage, open_storage
from .transfer import committed_steps, copy_step, generation_of, parent_of, read_manifest, step_files, verify_step
from .types import CheckpointInfo, SaveResult

log = logging.getLogger("ckptstore")

StepSpec = int | Literal["latest", "best"]
PINS_DIR = "pins"


_gc_lock = threading.Lock()
_gc_state = {"depth": 0, "was_enabled": False}


def _gc_paused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Pause Python's cyclic GC while the caller is blocked in ``fn``.

    A 10k-tensor save allocates enough small objects to trigger several full collections (~0.5 s measured, half
    of the save); none of those objects form cycles, so the pause costs nothing and GC resumes right after.
    """
    import functools
    import gc

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _gc_lock:
            if _gc_state["depth"] == 0:
                _gc_state["was_enabled"] = gc.isenabled()
                gc.disable()
            _gc_state["depth"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _gc_lock:
                _gc_state["depth"] -= 1
                if _gc_state["depth"] == 0 and _gc_state["was_enabled"]:
                    gc.enable()

    return wrapper


def _gc_after_fork_in_child() -> None:
    # A thread of the parent may have been inside a paused save at the fork: that pause is not the child's.
    global _gc_lock
    import gc

    _gc_lock = threading.Lock()
    if _gc_state["depth"] and _gc_state["was_enabled"]:
        gc.enable()
    _gc_state.update(depth=0, was_enabled=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_gc_after_fork_in_child)


def _dtensor_type() -> type | None:
    """DTensor's class if ``torch.distributed.tensor`` was imported, else None (then no DTensor can exist).

    Importing it ourselves would cost ~0.6 s (it pulls in sympy) in every process that never uses DTensors.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


_Box = tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]


def _pickle_tensor(obj: Any) -> torch.Tensor:
    buf = _pyio.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def _version_of(t: torch.Tensor) -> int | None:
    """Autograd's in-place change counter of ``t`` (None for inference tensors, which have none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _check_unchanged(step: int, boxes: dict[str, _Box], versions: dict[str, int | None]) -> None:
    changed = [k for k, v in versions.items() if v is not None and _version_of(boxes[k][0]) != v]
    if changed:
        shown = ", ".join(repr(k) for k in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise StateChangedError(
            f"step {step} was not saved: {shown} changed in place while the overlapped staging copy was running, "
            "so the snapshot could mix old and new values. Call pending.wait_staged() before changing state "
            "outside optimizer.step() and module forwards, or use overlap_staging=False"
        )


def _tensor_local_box(t: torch.Tensor) -> _Box:
    """(local tensor, global shape, global offsets of the local box) for plain tensors and DTensors."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(t, DTensor):
        return t, tuple(t.shape), (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(p.is_partial() for p in t.placements):
        # A Partial local tensor is a summand, not a box of the value: writing it would store wrong data.
        raise UnsupportedValueError(
            f"cannot checkpoint a DTensor with a Partial placement {t.placements}; reduce it first, e.g. "
            "t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)"
        )
    local = t.to_local()
    _, offs = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return local, tuple(t.shape), tuple(int(o) for o in offs)


def _lower_thread_priority(nice: int) -> None:
    """Make the calling thread (and the threads it starts, which inherit it) yield the CPU to training.

    Linux keeps a nice value per thread; elsewhere this is a no-op.
    """
    if not nice or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as e:  # e.g. a sandbox forbidding it: only scheduling is lost
        log.debug("could not lower the priority of the async save thread: %s", e)


class PendingSave:
    """Handle of a save running in the background (``save(..., blocking=False)``).

    Example::

        pending = mgr.save(step, state, blocking=False)
        ...                      # keep training
        result = pending.wait()  # re-raises a background error with its original type
    """

    def __init__(self, step: int, future: Future[SaveResult], copy: overlap.Copy | None = None) -> None:
        self.step = step
        self._future = future
        self._copy = copy
        self._reported = False  # an error the caller has already seen is not raised again by close()

    def done(self) -> bool:
        return self._future.done()

    def staged(self) -> bool:
        """True once the state has been copied to staging memory (always, unless ``overlap_staging``)."""
        return self._copy is None or self._copy.event.is_set()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Block until the state has been copied, after which it may be changed in any way; False on timeout.

        Only needed with ``overlap_staging=True``, before changing saved tensors other than by
        ``optimizer.step()`` or a module's forward (those wait by themselves)::

            pending = mgr.save(step, state, blocking=False)
            loss = model(batch).sum(); loss.backward()
            pending.wait_staged()
            ema.update(model)            # changes saved tensors in place
        """
        return self._copy is None or self._copy.wait(timeout)

    def wait(self, timeout: float | None = None) -> SaveResult:
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self._reported = True
            raise

    def exception(self) -> BaseException | None:
        if not self._future.done():
            return None
        e = self._future.exception()
        self._reported = self._reported or e is not None
        return e


@dataclass
class _ReadCtx:
    """Everything one restore/load pass accumulates before any target is touched."""

    manifest: Manifest
    map_location: Any
    rank: int
    storage: Storage | None = None
    tasks: list[ReadTask] = field(default_factory=list)
    deferred: list[Callable[[], None]] = field(default_factory=list)
    moves: dict[int, torch.device] = field(default_factory=dict)
    pickles: dict[int, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warned_devices: set[str] = field(default_factory=set)
    map_files: bool = False
    """Fresh CPU tensors may be views of copy-on-write maps of the shard files (``load()`` on local disk)."""
    maps: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, Piece, memoryview]] = field(default_factory=list)
    """Pieces that are mapped, not read: only their checksums are checked."""
    written: dict[tuple[int, int], str] = field(default_factory=dict)
    """Target memory (address, bytes) that the reads overwrite before they are verified, by state path."""
    covered: set[tuple[int, int]] = field(default_factory=set)
    """Target memory this pass sets in full once it verified (read into directly or copied in afterwards)."""
    missing_per_rank: list[str] = field(default_factory=list)
    """PerRank targets for which the step holds no value of this rank (saved at another world size)."""


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
        self.storage: Storage = open_storage(os.fspath(root), storage_options, io=self.io)
        self.url = self.storage.url
        self.allow_pickle = allow_pickle
        self.async_save = async_save
        if not isinstance(overlap_staging, bool):
            raise ConfigError(f"overlap_staging must be True or False, got {overlap_staging!r}")
        self.overlap_staging = overlap_staging
        self.retention = _coerce_retention(retention)
        if distributed is not None and not isinstance(distributed, bool):
            raise ConfigError(f"distributed must be True, False or None, got {distributed!r}")
        if comm is None:
            comm = LocalComm() if distributed is False else default_comm(self.io.timeout_seconds)
            if distributed and not comm.is_distributed:
                raise ConfigError(
                    "distributed=True but torch.distributed is not initialised with more than one rank; call "
                    "torch.distributed.init_process_group() first (or leave distributed=None)"
                )
        self.comm = comm  # no collective yet: a process group is created at the first save/restore
        self._manifests: dict[tuple[str, int], Manifest] = {}
        # Tiered storage: commit on the (fast, local) primary, then copy each committed step to the mirror in
        # the background; restore takes the newest verified step of either tier.
        self.mirror_storage: Storage | None = (
            open_storage(os.fspath(mirror), mirror_storage_options, io=self.io) if mirror is not None else None
        )
        if self.mirror_storage is not None and self.mirror_storage.url == self.storage.url:
            raise ConfigError(f"mirror {self.mirror_storage.url} is the same location as the root")
        self._mirror_executor: Any = None
        self._mirror_futures: list[Future[Any]] = []
        # Steps on the primary that the mirror still lacks (queued, in flight or failed): primary retention never
        # deletes them, and failed ones are retried at the next save, flush_mirror() and close().
        self._mirror_pending: set[int] = set()
        self._mirror_failed: dict[int, BaseException] = {}
        self._mirror_backlog_checked = False
        self._staging = StagingPool(self.io.staging_budget_bytes)
        self._lock = threading.Lock()
        self._pending: PendingSave | None = None
        self._executor: Any = None
        self._restoring: set[int] = set()
        self._closed = False
        self._pid = os.getpid()
        # Lineage: the (step, generation) the next save continues from (the last restore or save), and the step a
        # restore went back to while newer steps may exist (they are superseded at the next save).
        self._last_saved: tuple[int, int] | None = None
        self._restored: tuple[int, int] | None = None
        self._verified: set[tuple[str, int, int]] = set()

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

    # -- listing --------------------------------------------------------------------------------------------
    def _tier(self, tier: str) -> Storage:
        if tier == "primary":
            return self.storage
        if tier == "mirror" and self.mirror_storage is not None:
            return self.mirror_storage
        raise ConfigError(f"unknown storage tier {tier!r} (this manager has: {', '.join(self.tiers)})")

    @property
    def tiers(self) -> list[str]:
        """``["primary"]``, plus ``"mirror"`` for a tiered manager."""
        return ["primary"] + (["mirror"] if self.mirror_storage is not None else [])

    def steps(self, tier: Literal["primary", "mirror", "all"] = "primary") -> list[int]:
        """Committed steps (those with a manifest), ascending as integers; ``tier="all"`` merges both tiers."""
        if tier == "all":
            return sorted({s for t in self.tiers for s in self.steps(t)})  # type: ignore[arg-type]
        with self._lock:
            known = {s for t, s in self._manifests if t == tier}
        return committed_steps(self._tier(tier), known)

    def _manifest(self, step: int, tier: str = "primary", *, any_generation: bool = False) -> Manifest:
        """The visible generation's manifest of ``step`` (cached). ``any_generation``: for a step whose
        generations are all quarantined, the newest of them; asked for by number, a quarantined step is still
        read (and fully verified), so it can be inspected, or used again once repaired."""
        m = self._manifests.get((tier, step))
        if m is not None:
            return m
        storage = self._tier(tier)
        try:
            m, _ = read_manifest(storage, step)
        except CheckpointNotFoundError:
            files = step_files(storage, step)
            if any_generation and files.committed:
                return read_manifest(storage, step, files.committed[-1])[0]
            reason = self._quarantine_reason(storage, step)
            why = f"it is quarantined: {reason[:300]}" if reason is not None else f"no {MANIFEST_NAME}"
            raise CheckpointNotFoundError(
                f"step {step} is not committed under {storage.url} ({why}); committed steps: "
                f"{_fmt_steps(self.steps(tier))}",  # type: ignore[arg-type]
                step=step,
            ) from None
        with self._lock:
            self._manifests[(tier, step)] = m
        return m

    @staticmethod
    def _quarantine_reason(storage: Storage, step: int, generation: int | None = None) -> str | None:
        """Why the newest (or the given) quarantined generation of ``step`` is out of service, or None."""
        try:
            files = step_files(storage, step)
            gens = sorted(files.quarantined) if generation is None else [generation]
            if not gens or gens[-1] not in files.quarantined:
                return None
            rel = f"{step_dir(step)}/{quarantine_name(gens[-1])}"
            entry = storage.stat(rel)
            if entry is None or entry.kind != "file" or entry.size > 65536:
                return "quarantined (the marker is not a small file)"
            body = json.loads(storage.read_bytes(rel))
            reason = body.get("reason") if isinstance(body, dict) else None
            return reason if isinstance(reason, str) else "quarantined"
        except (OSError, EOFError, ValueError):
            return "quarantined (the marker cannot be read)"

    def _info(self, m: Manifest, tier: str = "primary", *, quarantined: str | None = None) -> CheckpointInfo:
        verified = True if (tier, m.step, generation_of(m)) in self._verified else None
        if quarantined is not None and quarantined.startswith("failed verification"):
            verified = False
        return CheckpointInfo(
            step=m.step,
            epoch=m.epoch,
            metrics=dict(m.metrics),
            metadata=dict(m.metadata),
            created_at=m.created_at,
            nbytes=m.nbytes,
            world_size=m.world_size,
            url=self._tier(tier).url_of(step_dir(m.step)),
            tier=tier,
            generation=generation_of(m),
            parent=parent_of(m),
            verified=verified,
            quarantined=quarantined,
        )

    def info(self, step: int) -> CheckpointInfo:
        """Metadata of a committed step (``CheckpointNotFoundError`` if there is none)."""
        step = _check_step(step)
        m = self._manifest(step, any_generation=True)
        with self._lock:
            visible = ("primary", step) in self._manifests
        reason = None if visible else self._quarantine_reason(self.storage, step, generation_of(m))
        return self._info(m, quarantined=reason)

    def manifest(self, step: int) -> Manifest:
        """The parsed manifest of a committed step (read-only use)."""
        return self._manifest(_check_step(step), any_generation=True)

    def history(
        self, tier: Literal["primary", "mirror"] = "primary", *, include_quarantined: bool = False
    ) -> list[CheckpointInfo]:
        """Every committed step's info (step, epoch, metrics, bytes, created_at, generation, parent), ascending;
        unreadable manifests are skipped with a warning. ``include_quarantined``: every generation of every step,
        quarantined ones too (``info.quarantined`` says why) — the lineage ``ckptstore ls --all`` shows."""
        if not include_quarantined:
            out = []
            for s in self.steps(tier):
                try:
                    out.append(self._info(self._manifest(s, tier), tier))
                except (ManifestError, CheckpointNotFoundError) as e:
                    log.warning("skipping step %d (%s tier): %s", s, tier, e)
            return out
        storage = self._tier(tier)
        out = []
        for entry in storage.list_entries(""):
            s = parse_step_dir(entry.name)
            if s is None or entry.kind != "dir":
                continue
            files = step_files(storage, s)
            for g in files.committed:
                try:
                    m, _ = read_manifest(storage, s, g)
                except (ManifestError, CheckpointNotFoundError, UnsafeCheckpointError) as e:
                    log.warning("skipping step %d generation %d (%s tier): %s", s, g, tier, e)
                    continue
                reason = self._quarantine_reason(storage, s, g) if g in files.quarantined else None
                out.append(self._info(m, tier, quarantined=reason))
        return sorted(out, key=lambda i: (i.step, i.generation))

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
        from .retention import rank_by_metric

        ranked = rank_by_metric(self.history(), metric, mode)
        return ranked[0] if ranked else None

    # -- pins -----------------------------------------------------------------------------------------------
    def pin(self, step: int) -> None:
        """Protect a committed step from retention (stored under the root, survives restarts)."""
        self._manifest(_check_step(step))
        if self.comm.rank == 0:
            self.storage.write_bytes(f"{PINS_DIR}/{step_dir(step)}", b"")

    def unpin(self, step: int) -> None:
        if self.comm.rank == 0:
            self.storage.remove(f"{PINS_DIR}/{step_dir(_check_step(step))}")

    def pinned(self) -> list[int]:
        return sorted(s for s in (parse_step_dir(n) for n in self.storage.list_dir(PINS_DIR)) if s is not None)

    # -- save -------------------------------------------------------------------------------------------------
    @_gc_paused
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
        step = _check_step(step)
        if blocking is None:
            blocking = not self.async_save
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or abs(epoch) > MAX_INT64):
            raise UnsupportedValueError(f"epoch must be an int (64-bit) or None, got {epoch!r}")
        metrics = dict(metrics or {})
        metadata = dict(metadata or {})
        encode_json(metrics, "metrics")  # fail fast, before any byte is written
        encode_json(metadata, "metadata")
        self.wait()  # at most one save in flight; re-raises a failed background save
        self.comm.ensure()  # a group is created here, on the caller's thread, never by the background save
        t0 = time.perf_counter()
        created_at = time.time()
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        try:
            flat = flatten(state, rank=self.comm.rank, allow_pickle=pickle_ok)
            if not blocking and not self._staging.fits(_flat_nbytes(flat)):
                log.warning(
                    "step %d: state (%.1f MiB) exceeds the staging budget (%.1f MiB); saving synchronously",
                    step,
                    _flat_nbytes(flat) / 2**20,
                    (self.io.staging_budget_bytes or 0) / 2**20,
                )
                blocking = True
            if not blocking and self.overlap_staging:
                # Only what is cheap is taken now: small tensors (buffers that forwards change, compiled ones
                # too). The rest is copied while the next forward/backward runs, watched by version counter.
                boxes = self._boxes(flat)
                early = {k: self._staging.stage(k, b[0]) for k, b in boxes.items() if overlap.is_small(b[0])}
                versions = {k: _version_of(b[0]) for k, b in boxes.items() if k not in early}
                pickled = {k: _pickle_tensor(o) for k, o in flat.pickles.items()}
                job = _SaveJob(step, flat.tree, {}, [], epoch, metrics, metadata, created_at, t0)
                return self._save_overlapped(job, flat, boxes, versions, pickled, early)
            sources, specs = self._sources(flat, stage=not blocking)
            job = _SaveJob(step, flat.tree, sources, specs, epoch, metrics, metadata, created_at, t0)
        except Exception as e:
            if not self.comm.is_distributed:
                raise
            # Take part in the protocol anyway, so the other ranks learn about the failure at once instead of
            # waiting for a collective that this rank would never join.
            job = _SaveJob(step, None, {}, [], epoch, metrics, metadata, created_at, t0, prep_error=e)
            blocking = True
        if blocking:
            return self._run_save(job)
        blocked = time.perf_counter() - t0
        job.blocking_seconds = blocked
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="ckpt-async",
                initializer=_lower_thread_priority,
                initargs=(self.io.background_nice,),
            )
        fut = self._executor.submit(self._run_save, job)
        self._pending = PendingSave(step, fut)
        return self._pending

    def _save_overlapped(
        self,
        job: _SaveJob,
        flat: Any,
        boxes: dict[str, _Box],
        versions: dict[str, int | None],
        pickled: dict[str, torch.Tensor],
        early: dict[str, torch.Tensor],
    ) -> PendingSave:
        """Start the staging copy and then the write on a fresh thread; return at once (``overlap_staging``)."""
        copy = overlap.begin()
        job.copy = copy
        job.blocking_seconds = time.perf_counter() - job.t0
        fut: Future[SaveResult] = Future()
        fut.set_running_or_notify_cancel()

        def run() -> None:
            try:
                try:
                    job.sources, job.specs = self._sources(flat, stage=True, boxes=boxes, pickled=pickled, staged=early)
                    _check_unchanged(job.step, boxes, versions)
                finally:
                    overlap.end(copy)  # training may go on, even if the copy failed
            except Exception as e:
                if not self.comm.is_distributed:
                    fut.set_exception(e)
                    return
                job.prep_error, job.sources, job.specs = e, {}, []  # the other ranks must learn of it
            # The copy ran at the caller's priority (training waits for it); the write yields the CPU.
            _lower_thread_priority(self.io.background_nice)
            try:
                fut.set_result(self._run_save(job))
            except BaseException as e:
                fut.set_exception(e)

        # A thread of its own, not an executor: executors refuse new work once the interpreter starts to exit,
        # and a save whose copy is already running should still commit then.
        try:
            threading.Thread(target=run, name=f"ckpt-overlap-{job.step}").start()
        except BaseException:
            overlap.end(copy)  # never leave optimizer steps waiting for a copy that will not run
            raise
        self._pending = PendingSave(job.step, fut, copy)
        return self._pending

    def _boxes(self, flat: Any) -> dict[str, _Box]:
        return {key: _tensor_local_box(t.detach()) for key, t in flat.tensors.items()}

    def _sources(
        self,
        flat: Any,
        *,
        stage: bool,
        boxes: dict[str, _Box] | None = None,
        pickled: dict[str, torch.Tensor] | None = None,
        staged: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, Source], list[LocalSpec]]:
        """Sources and specs of ``flat``; ``staged`` holds tensors already copied to staging buffers."""
        sources: dict[str, Source] = {}
        specs: list[LocalSpec] = []
        order = 0
        staged = dict(staged or {})
        if boxes is None:
            boxes = self._boxes(flat)
        todo = [
            (key, box[0]) for key, box in boxes.items() if key not in staged and (stage or box[0].device.type != "cpu")
        ]
        if todo:
            # A snapshot in reused host buffers: later training steps cannot change what gets written, and no
            # fresh memory is touched after the first save. Copies run on the I/O threads (torch releases the
            # GIL), since the caller is blocked for exactly this long. Plain threads, not an executor: an
            # overlapped copy may still run while the interpreter exits, when executors refuse new work.
            def stage_one(kv: tuple[str, torch.Tensor]) -> None:
                staged[kv[0]] = self._staging.stage(*kv)

            _parallel(stage_one, todo, self.io.threads, name="ckpt-stage")
        # Per-dtype and per-device strings computed once: states hold 10k+ tensors of a few dtypes/devices.
        dtypes: dict[torch.dtype, tuple[str, int]] = {}
        devices: dict[torch.device, str] = {}
        # Whole tensors are written once for all ranks: fingerprint them so rank 0 can tell diverged replicas.
        check = self.io.verify_replicas if self.comm.is_distributed else "off"
        for key, t in flat.tensors.items():
            local, gshape, offs = boxes[key]
            if key in staged:
                local = staged[key]
            elif not local.is_contiguous() or local.is_conj() or local.is_neg():
                local = local.resolve_conj().resolve_neg().contiguous()
            dt = dtypes.get(local.dtype)
            if dt is None:
                dt = dtypes[local.dtype] = (dtype_name(local.dtype), local.element_size())
            dev = devices.get(t.device)
            if dev is None:
                dev = devices[t.device] = str(t.device)
            sample = None
            if check != "off" and tuple(local.shape) == gshape and not any(offs):
                sample = sample_crc(tensor_bytes(local), full=check == "full")
            specs.append(
                LocalSpec(key, dt[0], dt[1], gshape, offs, tuple(local.shape), order, device=dev, sample=sample)
            )
            sources[key] = Source(local, offs, local.dtype)
            order += 1
        for key, obj in flat.pickles.items():
            raw = pickled[key] if pickled is not None else _pickle_tensor(obj)
            sources[key] = Source(raw, (0,), torch.uint8, "pickle")
            specs.append(LocalSpec(key, "uint8", 1, (raw.numel(),), (0,), (raw.numel(),), order, "pickle"))
            order += 1
        self._staging.synchronize()
        if stage:
            self._staging.retain(set(flat.tensors))
        return sources, specs

    def _plan_options(self) -> IOOptions:
        """``self.io``, with shard files no bigger than the storage prefers (S3: one PutObject each)."""
        cap = self.storage.preferred_file_bytes
        if cap is None or cap >= self.io.file_bytes:
            return self.io
        return replace(self.io, file_bytes=cap)

    def _run_save(self, job: _SaveJob) -> SaveResult:
        try:
            return self._save_protocol(job)
        finally:
            if job.lease is not None:
                job.lease.stop()  # whatever happened: never leave a lease refreshed by a thread forever

    def _save_protocol(self, job: _SaveJob) -> SaveResult:
        comm = self.comm
        prefix = step_dir(job.step)
        # 1. Rank 0 checks the step is free and picks the save id; everyone learns the answer.
        decision: dict[str, Any] = {}
        check_error: OSError | None = None
        if comm.rank == 0:
            exists, generation = None, 1
            try:
                self.storage.check_commit_support()  # refuse before any rank uploads a byte
                job.parent = self._lineage_for(job.step)
                files = step_files(self.storage, job.step)
                # A step number whose generations are all quarantined (failed verification, or superseded by a
                # run resumed from an older step) is saved again as the next generation.
                exists, generation = files.visible is not None, files.next_generation
            except OSError as e:
                check_error = e
                decision["error"] = f"cannot check {self.url}: {e}"
            decision.update(exists=exists, generation=generation, save_id=uuid.uuid4().hex[:8])
        decision = comm.broadcast(decision, what=f"start of the save of step {job.step}")
        if decision.get("error"):
            if not comm.is_distributed:
                what = f"step {job.step} was not saved"
                if isinstance(check_error, StorageError):  # typed by the storage: keep its class and errno
                    err = type(check_error)(f"{what}: {decision['error']}")
                    e0 = check_error
                    err.errno, err.strerror, err.filename = e0.errno, e0.strerror, e0.filename
                    raise err from check_error
                if check_error is not None:
                    raise _typed_os_error(check_error, f"{what}: cannot check {self.url}") from check_error
                raise StorageError(f"{what}: {decision['error']}")
            raise DistributedSaveError(decision["error"], failed_ranks={0: decision["error"]})
        if decision["exists"]:
            raise CheckpointExistsError(
                f"step {job.step} is already committed under {self.url}; steps are immutable — save under a new "
                "step number or delete it first",
                step=job.step,
            )
        save_id = decision["save_id"]
        job.generation = decision["generation"]
        committed = False
        lease_error: OSError | None = None
        # Other processes' gc must see this save as in progress however long it takes (a slow rank, a long
        # collective timeout): rank 0 keeps a lease file in the step directory fresh until the end.
        try:
            if comm.rank == 0:
                job.lease = _Lease(self.storage, prefix, save_id)
                try:
                    job.lease.start()
                except OSError as e:  # disk full, no permission: this save cannot succeed; every rank learns it
                    if not comm.is_distributed:
                        raise
                    lease_error = e  # reported as this rank's write failure below
            # 2. Plan: gather every rank's boxes, rank 0 plans, broadcast.
            mine_specs: Any = job.specs if job.prep_error is None else _PrepFailed(job.prep_error)
            all_specs = comm.gather(mine_specs, what=f"gather of tensor boxes for step {job.step}")
            plan: WritePlan | None = None
            plan_err = None
            prep_failed: dict[int, str] = {}
            if comm.rank == 0:
                assert all_specs is not None
                prep_failed = {r: x.message for r, x in enumerate(all_specs) if isinstance(x, _PrepFailed)}
                if prep_failed:
                    plan_err = "; ".join(f"rank {r} could not prepare its state: {m}" for r, m in prep_failed.items())
                if not prep_failed:
                    plan_err, prep_failed = _replica_problems(job.step, all_specs or [job.specs])
                try:
                    if not prep_failed:
                        plan = plan_writes(all_specs or [job.specs], save_id=save_id, options=self._plan_options())
                except Exception as e:  # any planning error must reach the other ranks, or they would wait
                    if not comm.is_distributed:
                        raise
                    plan_err = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            plan, plan_err, prep_failed = comm.broadcast(
                (plan, plan_err, prep_failed), what=f"broadcast of the write plan for step {job.step}"
            )
            if job.prep_error is not None:
                raise job.prep_error  # this rank's own error, with its original type
            if plan_err:
                raise DistributedSaveError(
                    f"cannot save step {job.step}: {plan_err}", failed_ranks=prep_failed or {0: plan_err}
                )
            assert plan is not None
            # 3. Write my files.
            mine = plan.for_rank(comm.rank)
            report: dict[str, Any]
            try:
                if lease_error is not None:
                    raise lease_error
                written = write_files(self.storage, prefix, mine, job.sources, self.io)
                report = {"ok": True, "files": written, "tree": job.tree}
            except Exception as e:
                if not comm.is_distributed:
                    raise
                log.error("rank %d failed writing step %d: %r", comm.rank, job.step, e)
                report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            # 4. Rank 0 commits iff every rank succeeded; the outcome is broadcast.
            reports = comm.gather(report, what=f"gather of write reports for step {job.step}")
            outcome: dict[str, Any] = {}
            if comm.rank == 0:
                assert reports is not None
                failed = {r: rep["error"] for r, rep in enumerate(reports) if not rep["ok"]}
                if failed:
                    outcome = {"ok": False, "failed": failed}
                else:
                    try:
                        m = self._build_manifest(job, all_specs or [job.specs], reports, save_id)
                        self._commit(job.step, m)
                        committed = True
                        outcome = {"ok": True, "nbytes": m.nbytes, "files": len(m.files)}
                    except CheckpointExistsError as e:
                        outcome = {"ok": False, "exists": str(e)}
                    except Exception as e:
                        if not comm.is_distributed:
                            raise
                        outcome = {"ok": False, "failed": {0: f"{type(e).__name__}: {e}"}}
            try:
                outcome = comm.broadcast(outcome, what=f"broadcast of the commit outcome for step {job.step}")
            except DistributedSaveError as e:
                if committed:
                    raise DistributedSaveError(
                        f"step {job.step} IS committed (its manifest is written), but telling the other ranks "
                        f"failed: {e}",
                        failed_ranks=e.failed_ranks,
                    ) from e
                raise
        except DistributedSaveError:
            # A collective failed (a rank died or is stuck) or the plan was refused: nothing is committed and
            # the files of this attempt are garbage. A committed step is never cleaned up.
            if not committed:
                self._cleanup_attempt(prefix, save_id, job.lease, job.generation)
            raise
        except BaseException as e:
            # Single process (or this rank's own preparation error): a write or the commit failed — disk full,
            # I/O error, S3 gave up after its retries. Nothing is committed; the files of this attempt go now
            # rather than at the next gc, and the caller gets a typed error that is still an OSError.
            if not committed:
                self._cleanup_attempt(prefix, save_id, job.lease, job.generation)
            typed = _typed_os_error(e, f"step {job.step} was not saved (nothing was committed)")
            if typed is e:
                raise
            raise typed from e
        if not outcome["ok"]:
            self._cleanup_attempt(prefix, save_id, job.lease, job.generation)
            if "exists" in outcome:
                raise CheckpointExistsError(outcome["exists"], step=job.step)
            failed = outcome["failed"]
            ranks = ", ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
            raise DistributedSaveError(
                f"step {job.step} was not committed because {len(failed)} rank(s) failed ({ranks}); the previous "
                "steps are untouched",
                failed_ranks=failed,
            )
        seconds = time.perf_counter() - job.t0
        deleted: tuple[int, ...] = ()
        if job.lease is not None:
            job.lease.stop()
        if comm.rank == 0:
            if self.mirror_storage is not None:
                self._enqueue_mirror(job.step)
            deleted = self._apply_retention(job.step)
        waited = job.copy.waited if job.copy is not None else 0.0
        res = SaveResult(
            step=job.step,
            url=self.storage.url_of(prefix),
            nbytes=outcome["nbytes"],
            files=outcome["files"],
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

    def _build_manifest(
        self, job: _SaveJob, all_specs: Sequence[Sequence[LocalSpec]], reports: list[dict[str, Any]], save_id: str
    ) -> Manifest:
        pieces: dict[str, list[Piece]] = {}
        files: dict[str, int] = {}
        for rep in reports:
            for wf in rep["files"]:
                files[wf.name] = wf.size
                for key, p in wf.pieces:
                    pieces.setdefault(key, []).append(p)
        tree = _merge_trees([rep["tree"] for rep in reports])
        spec_of: dict[str, LocalSpec] = {}
        for specs in all_specs:
            for sp in specs:
                spec_of.setdefault(sp.key, sp)
        entries: dict[str, TensorEntry] = {}
        for key in sorted(spec_of, key=lambda k: (spec_of[k].order, k)):
            sp = spec_of[key]
            ps = sorted(pieces.get(key, []), key=lambda p: (p.offsets or (), p.file, p.start))
            entries[key] = TensorEntry(sp.dtype, sp.global_shape, tuple(ps), sp.device, sp.encoding)
        return Manifest(
            step=job.step,
            tree=tree,
            tensors=entries,
            files=files,
            epoch=job.epoch,
            metrics=job.metrics,
            metadata=job.metadata,
            created_at=job.created_at,
            world_size=self.comm.world_size,
            save_id=save_id,
            versions={"ckptstore": __version__, "torch": torch.__version__, "python": platform.python_version()},
            extras={"lineage": _lineage(job.generation, job.parent)},
        )

    def _commit(self, step: int, m: Manifest) -> None:
        prefix = step_dir(step)
        generation = generation_of(m)
        rel = f"{prefix}/{manifest_name(generation)}"
        data = m.to_bytes()
        self._check_files(step, prefix, m.files)
        self.storage.sync_dir(prefix)
        try:
            self.storage.create_exclusive(rel, data)
        except FileExistsError:
            raise CheckpointExistsError(
                f"step {step} was committed by another writer while this save ran; this attempt is discarded",
                step=step,
            ) from None
        except OSError as e:
            # The outcome may be unknown (e.g. the answer to the S3 PUT was lost and the retries failed): if our
            # manifest is in place, the step IS committed and its data must not be cleaned up as a failed attempt.
            if self._own_manifest(prefix, m.save_id, generation) is not True:
                raise
            log.warning("step %d: the commit reported %r, but its manifest is in place: the step is committed", step, e)
        with self._lock:
            self._manifests[("primary", step)] = m
            self._last_saved, self._restored = (step, generation), None

    def _lineage_for(self, step: int) -> tuple[int, int] | None:
        """Rank 0, at the start of a save of ``step``: the (step, generation) it continues from.

        After a restore of an older step, a save at or below a step that exists means the run went back in time
        (a fallback after damage, or on purpose after a loss spike): every visible step newer than the restored
        one belongs to the abandoned timeline and is quarantined as superseded, on every tier, before this save
        commits, so ``latest`` never returns to it and the same step numbers can be saved again as new
        generations. A save above every existing step (training simply went on, e.g. after restoring an old
        step into an evaluation model) supersedes nothing."""
        restored = self._restored
        if restored is None:
            return self._last_saved
        newer = {t: [x for x in self.steps(t) if x > restored[0]] for t in self.tiers}  # type: ignore[arg-type]
        if not any(x >= step for xs in newer.values() for x in xs):
            return self._last_saved or restored
        why = f"superseded: the run resumed from step {restored[0]} and saved step {step} on a new timeline"
        for tier, xs in newer.items():
            for x in xs:
                self._quarantine(tier, x, why)
        return restored

    def _quarantine(self, tier: str, step: int, reason: str, generation: int | None = None) -> None:
        """Take a generation of ``step`` out of service: a marker file beside its manifest (rank 0 only)."""
        storage = self._tier(tier)
        g = generation if generation is not None else step_files(storage, step).visible
        if g is None:
            return
        body = json.dumps({"generation": g, "reason": reason, "at": time.time(), "host": platform.node()})
        try:
            storage.create_exclusive(f"{step_dir(step)}/{quarantine_name(g)}", body.encode())
        except FileExistsError:
            pass  # quarantined already (another rank or process)
        with self._lock:
            self._manifests.pop((tier, step), None)
        log.warning("quarantined step %d generation %d (%s tier): %s", step, g, tier, reason)

    def _quarantine_if_damaged(self, step: int, tier: str) -> None:
        """Rank 0, after a restore/load fell back from ``step``: re-verify it once (a transient short read must
        not retire a good step) and quarantine it if it still fails."""
        if self.comm.rank != 0:
            return
        try:
            res = verify_step(self._tier(tier), step, threads=self.io.threads)
        except CheckpointNotFoundError:
            return
        except (OSError, CheckpointError) as e:
            log.warning("could not re-verify step %d (%s tier) to quarantine it: %s", step, tier, e)
            return
        if not res.ok:
            problems = "; ".join(str(p) for p in res.problems[:3])
            self._quarantine(tier, step, f"failed verification: {problems}")

    def _check_files(self, step: int, prefix: str, files: Mapping[str, int]) -> None:
        """Every file the manifest names is there with its size (one listing), or nothing is committed: another
        process (a gc with too short a min-age, a cleanup script) may have removed finished shards meanwhile."""
        have = {e.name: e.size for e in self.storage.list_entries(prefix) if e.kind == "file"}
        bad = [f"{n} ({'missing' if n not in have else f'{have[n]} bytes, not {size}'})"
               for n, size in files.items() if have.get(n) != size]  # fmt: skip
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            err = StorageError(
                f"step {step} was not committed: files written by this save are gone or changed: {shown}. Another "
                f"process removed or rewrote them under {self.url} while the save ran (a gc with a min-age shorter "
                "than the save?); save again"
            )
            err.errno = errno.ENOENT
            raise err

    def _own_manifest(self, prefix: str, save_id: str, generation: int = 1) -> bool | None:
        """Whether the manifest under ``prefix`` is the one of save ``save_id`` (None: it cannot be told now)."""
        rel = f"{prefix}/{manifest_name(generation)}"
        try:
            if not self.storage.exists(rel):
                return False
            return Manifest.from_bytes(self.storage.read_bytes(rel), where=rel).save_id == save_id
        except FileNotFoundError:
            return False
        except (OSError, EOFError, CheckpointError):
            return None

    def _cleanup_attempt(self, prefix: str, save_id: str, lease: _Lease | None = None, generation: int = 1) -> None:
        """Remove the files of failed save ``save_id`` — never those of a committed step or of another writer."""
        if lease is not None:
            lease.stop()
        if self.comm.rank != 0:
            return
        own = self._own_manifest(prefix, save_id, generation)
        if own is not False:
            # Committed after all (an ambiguous commit), or the storage cannot tell right now: leave the files;
            # gc removes them later if they turn out to be garbage.
            if own is None:
                log.warning("not cleaning up the failed save under %s: cannot tell whether it committed", prefix)
            return
        try:
            for name in self.storage.list_dir(prefix):
                if name.startswith(f"shard-{save_id}-") or name == f"{LEASE_PREFIX}{save_id}":
                    self.storage.remove(f"{prefix}/{name}")
            # Only an empty directory goes: another writer may be saving this step right now (list + remove_tree
            # would race with it and could delete files it just created, or even its committed step).
            self.storage.remove_dir(prefix)
        except OSError as e:
            log.warning("could not clean up the failed attempt under %s: %s", prefix, e)

    # -- retention & deletion -----------------------------------------------------------------------------------
    def _apply_retention(self, committed: int, tier: str = "primary") -> tuple[int, ...]:
        if self.retention is None:
            return ()
        from .retention import select_deletions

        with self._lock:
            # Never delete what is being restored, or a step still waiting to be copied to the mirror.
            protect = {committed, *self._restoring, *(self._mirror_pending if tier == "primary" else ())}
        # Retention runs after the commit: whatever goes wrong here (an I/O error while listing, a custom policy
        # raising) must not turn a committed save into an error. It is logged; the next save retries.
        try:
            infos = self.history(tier)  # type: ignore[arg-type]
            doomed = select_deletions(infos, self.retention, now=time.time(), pinned=self.pinned(), protect=protect)
        except Exception as e:
            log.warning("retention skipped after committing step %d (%s tier): %r", committed, tier, e)
            return ()
        deleted = []
        for s in doomed:
            try:
                self._delete_in(tier, s)
                deleted.append(s)
                log.info("retention deleted step %d (%s tier)", s, tier)
            except Exception as e:
                log.warning("retention could not delete step %d (%s tier): %r", s, tier, e)
        return tuple(deleted)

    # -- tiered mirror ----------------------------------------------------------------------------------------------
    def _enqueue_mirror(self, step: int | None = None) -> None:
        """Queue ``step`` for the mirror, after every earlier step the mirror still lacks (failed uploads of this
        process; once per manager, committed primary steps newer than anything on the mirror, i.e. uploads an
        earlier process did not finish)."""
        from concurrent.futures import ThreadPoolExecutor

        backlog: set[int] = set()
        if not self._mirror_backlog_checked:
            self._mirror_backlog_checked = True
            try:
                on_mirror = self.steps("mirror")
                backlog = {s for s in self.steps("primary") if s > (on_mirror[-1] if on_mirror else -1)}
            except OSError as e:
                log.warning("could not list the mirror %s to resume unfinished uploads: %s", self.mirror_storage, e)
        with self._lock:
            todo = set(self._mirror_failed) | (backlog - self._mirror_pending)
            if step is not None:
                todo.add(step)
            if todo and self._mirror_executor is None:
                self._mirror_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-mirror")
            for s in sorted(todo):
                self._mirror_pending.add(s)  # from now on protected from primary retention
                self._mirror_failed.pop(s, None)
                self._mirror_futures.append(self._mirror_executor.submit(self._mirror_one, s))

    def _mirror_one(self, step: int) -> int:
        assert self.mirror_storage is not None
        try:
            t0 = time.perf_counter()
            res = copy_step(self.storage, self.mirror_storage, step, threads=self.io.threads)
            log.info(
                "mirrored step %d to %s: %.1f MiB in %.2fs",
                step,
                self.mirror_storage.url_of(step_dir(step)),
                res.nbytes / 2**20,
                time.perf_counter() - t0,
            )
        except CheckpointExistsError:
            log.info("step %d is already on the mirror", step)
        except CheckpointNotFoundError:
            log.info("step %d is no longer on the primary; nothing to mirror", step)
        except Exception as e:
            # The step stays pending (primary retention keeps it) and is retried at the next save, flush_mirror()
            # and close().
            log.error(
                "could not mirror step %d to %s (kept on the primary, will retry): %s", step, self.mirror_storage.url, e
            )
            with self._lock:
                self._mirror_failed[step] = e
            raise
        with self._lock:
            self._mirror_pending.discard(step)
            self._mirror_failed.pop(step, None)
        self._apply_retention(step, tier="mirror")
        return step

    def flush_mirror(self, timeout: float | None = None) -> list[int]:
        """Wait until every committed step queued for the mirror is copied; returns those steps.

        Uploads that failed are tried once more. If some still fail, raises
        :class:`StorageError` naming them (they stay on the primary tier, protected from its retention, and are
        retried at the next save, ``flush_mirror()`` or ``close()``).
        """
        if self.mirror_storage is None:
            return []
        if self._pid != os.getpid():
            self._after_fork(refuse=False)
        done = self._drain_mirror(timeout)
        if self._mirror_failed and self.comm.rank == 0:
            self._enqueue_mirror()  # one more try of what failed
            done += self._drain_mirror(timeout)
        with self._lock:
            failed = dict(self._mirror_failed)
        if failed:
            first = next(iter(failed.values()))
            err = StorageError(
                f"steps {_fmt_steps(sorted(failed))} could not be copied to the mirror {self.mirror_storage.url} "
                f"({type(first).__name__}: {first}); they stay on {self.url}, kept by retention, and are retried at "
                "the next save, flush_mirror() or close()"
            )
            if isinstance(first, OSError):
                err.errno = first.errno
            raise err from first
        return sorted(done)

    def _drain_mirror(self, timeout: float | None) -> list[int]:
        """Wait for the queued uploads; the steps that reached the mirror (failures are in ``_mirror_failed``)."""
        with self._lock:
            futs, self._mirror_futures = self._mirror_futures, []
        done: list[int] = []
        for f in futs:
            try:
                done.append(f.result(timeout))
            except Exception:
                pass  # recorded in _mirror_failed by _mirror_one
        return done

    def delete(self, step: int, *, tier: Literal["primary", "mirror"] = "primary") -> None:
        """Delete a committed step: its manifest first (the step disappears atomically), then its data.

        Raises ``CheckpointNotFoundError`` if there is no such step, and ``StorageError`` (still the storage's
        ``OSError`` subclass, e.g. ``PermissionError``) when the storage refuses."""
        step = _check_step(step)
        try:
            self._delete_in(tier, step)
        except OSError as e:
            typed = _typed_os_error(
                e, f"step {step} could not be (fully) deleted from {self._tier(tier).url}; check the permissions"
            )
            if typed is e:
                raise
            raise typed from e

    def _delete_in(self, tier: str, step: int) -> None:
        if self.comm.rank != 0:
            return
        storage = self._tier(tier)
        prefix = step_dir(step)
        with self._lock:
            self._manifests.pop((tier, step), None)
        names = storage.list_dir(prefix)
        if not names:
            raise CheckpointNotFoundError(f"step {step} does not exist under {storage.url}", step=step)
        for name in names:  # every generation's manifest first: the step disappears before its data goes
            if parse_manifest_name(name) is not None:
                storage.remove(f"{prefix}/{name}")
        storage.sync_dir(prefix)
        storage.remove_tree(prefix)
        if tier == "primary":
            storage.remove(f"{PINS_DIR}/{prefix}")

    def gc(self, *, min_age_seconds: float = 600.0) -> list[str]:
        """Remove partial steps (no manifest) and unreferenced files inside committed steps.

        Only files older than ``min_age_seconds`` are touched, and a step directory whose running save keeps its
        lease fresh (``.saving-<id>``, refreshed every 30 s) is not touched at all, however long the save takes.
        Symbolic links, FIFOs and other entries that are not real directories/files are never followed or
        removed (a warning names them). Returns the removed paths (relative to the root).
        """
        if self.comm.rank != 0:
            return []
        removed: list[str] = []
        now = time.time()
        try:
            for entry in self.storage.list_entries(""):
                s = parse_step_dir(entry.name)
                if s is None:
                    continue
                if entry.kind != "dir":
                    log.warning("gc: leaving %s alone: a %s, not a step directory", entry.name, _kind(entry))
                    continue
                removed += self._gc_step(entry.name, s, now, min_age_seconds)
            # Multipart uploads younger than min_age may belong to a save in progress elsewhere.
            self.storage.abort_incomplete_uploads("", older_than_seconds=min_age_seconds)
        except OSError as e:
            typed = _typed_os_error(e, f"gc of {self.url} stopped")
            if typed is e:
                raise
            raise typed from e
        return removed

    def _lease_live(self, rel: str, entry: Any, now: float) -> bool:
        """A lease protects its step until it is ``LEASE_TTL_SECONDS`` old, or at once if it names a process of
        this host that no longer runs (a killed save)."""
        if _age(entry, now) >= LEASE_TTL_SECONDS:
            return False
        try:
            body = json.loads(self.storage.read_bytes(rel)) if entry.size <= 4096 else {}
        except (OSError, EOFError, ValueError):
            return True  # unreadable right now: trust its age
        if not isinstance(body, dict) or body.get("host") != platform.node() or not isinstance(body.get("pid"), int):
            return True
        if body.get("start") is None:  # no process start times here (not Linux): only the age tells
            return True
        start = _proc_start(body["pid"])
        return start is not None and start == body.get("start")

    def _gc_step(self, name: str, step: int, now: float, min_age: float) -> list[str]:
        entries = self.storage.list_entries(name)
        leases = [e for e in entries if e.name.startswith(LEASE_PREFIX) and e.kind == "file"]
        if any(self._lease_live(f"{name}/{e.name}", e, now) for e in leases):
            log.info("gc: leaving %s alone: a save is in progress there (%s)", name, leases[0].name)
            return []
        files = StepFiles.from_entries((e.name, e.kind) for e in entries)
        committed = bool(files.committed)
        keep: set[str] = {e.name for e in entries if parse_manifest_name(e.name) or parse_quarantine_name(e.name)}
        if committed:
            try:
                for g in files.committed:  # quarantined generations too: kept for inspection
                    keep |= set(read_manifest(self.storage, step, g)[0].files)
                # Artifacts committed next to the step (their sidecar exists) are part of it too.
                from .artifacts import list_artifacts, sidecar_name

                for a in list_artifacts(self.storage, step):
                    keep |= {a.file, sidecar_name(a.name)}
            except CheckpointError as e:
                log.warning("gc: leaving step %d alone, its manifest is unreadable: %s", step, e)
                return []
        removed = []
        for e in entries:
            if e.name in keep:
                continue
            rel = f"{name}/{e.name}"
            if e.kind != "file":
                log.warning("gc: leaving %s alone: a %s, not a file ckptstore writes", rel, _kind(e))
                continue
            if _age(e, now) < min_age:
                continue
            self.storage.remove(rel)
            removed.append(rel)
        if not committed:
            self.storage.remove_dir(name)  # only if empty: a save may be creating files in it right now
        return removed

    # -- restore / load ---------------------------------------------------------------------------------------------
    def _candidates(self, step: StepSpec) -> list[tuple[int, str]]:
        """(step, tier) pairs to try, best first. Each step's primary copy comes before its mirror copy."""
        if step == "best":
            b = self.best()
            if b is None:
                raise CheckpointNotFoundError(f"no committed step under {self.url} has a finite numeric 'loss' metric")
            wanted = [b.step]
        elif step == "latest":
            wanted = None
        else:
            wanted = [_check_step(step)]
        if wanted is not None:
            # One existence check per tier for the step asked for, not a listing of every step (a LIST plus a
            # HEAD per step on S3).
            out = [
                (s, t)
                for s in wanted
                for t in self.tiers
                if (t, s) in self._manifests or step_files(self._tier(t), s).committed
            ]
            return out or [(wanted[0], "primary")]  # reading it raises a CheckpointNotFoundError listing the steps
        on = {t: set(self.steps(t)) for t in self.tiers}  # type: ignore[arg-type]
        steps = sorted(set().union(*on.values()), reverse=True)
        return [(s, t) for s in steps for t in self.tiers if s in on[t]]

    @_gc_paused
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
        comm = self.comm
        # "latest"/"best" is decided once, by rank 0: ranks listing the storage themselves could disagree while a
        # save commits. A failure to decide reaches every rank instead of leaving them waiting.
        decided: tuple[str, Any] = ("ok", None)
        if comm.rank == 0:
            try:
                decided = ("ok", self._candidates(step))
            except Exception as e:
                if not comm.is_distributed:
                    raise
                decided = ("err", (type(e).__name__, str(e)))
        kind_, cands = comm.broadcast(decided, what=f"choice of the step to restore ({step!r})")
        if kind_ == "err":
            raise _remote_error(0, cands[0], cands[1], step if isinstance(step, int) else None)
        if not cands:
            raise CheckpointNotFoundError(f"no committed step under {self.url}")
        last: BaseException | None = None
        # Target memory that failed attempts already overwrote with unverified bytes: a fallback step must set
        # all of it again, or the state would mix two steps.
        dirty: dict[tuple[int, int], str] = {}
        failed: list[tuple[int, str]] = []  # fallen back from: re-verified and quarantined once one succeeds
        for i, (s, tier) in enumerate(cands):
            # Two phases, each ending in one all_gather: (1) every rank plans its reads and checks the state fits
            # (nothing changed yet, so a refusal on any rank leaves every rank's state untouched); (2) every rank
            # reads, verifies and only then changes its objects.
            rc: _ReadCtx | None = None
            self._restoring.add(s)
            try:
                err: BaseException | None = None
                try:
                    m = self._manifest(s, tier, any_generation=isinstance(step, int))
                    rc = self._plan_restore(m, state, map_location, strict, trusted, self._tier(tier), dirty)
                except Exception as e:  # every rank must reach the all_gather below, whatever went wrong here
                    err = self._read_error(e, s, tier)
                bad = self._outcomes(err, f"restore plan of step {s}")
                if not bad:
                    try:
                        assert rc is not None
                        self._apply_restore(rc, verify)
                    except Exception as e:
                        err = self._read_error(e, s, tier)
                    bad = self._outcomes(err, f"restore outcome of step {s}")
            finally:
                self._restoring.discard(s)
            if not bad:
                assert rc is not None
                m = self._manifest(s, tier, any_generation=isinstance(step, int))
                gen = generation_of(m)
                with self._lock:
                    # The restore is now what the next save continues from, not a step saved before it.
                    self._restored, self._last_saved = (s, gen), None
                    if verify is not False and self.io.verify:
                        self._verified.add((tier, s, gen))
                for bad_step, bad_tier in failed:
                    self._quarantine_if_damaged(bad_step, bad_tier)
                info = self._info(m, tier)
                return replace(info, missing_per_rank=tuple(rc.missing_per_rank))
            integrity = all(e[0] in ("IntegrityError", "ManifestError") for _, e in bad)
            same_step_next = i + 1 < len(cands) and cands[i + 1][0] == s  # the mirror's copy of this step
            if (step != "latest" and not same_step_next) or not integrity:
                if err is not None:
                    raise err
                r, (kind, msg) = bad[0]
                raise _remote_error(r, kind, f"could not restore step {s}: {msg}", s)
            log.warning(
                "step %d (%s tier) does not verify (%s); falling back to %s",
                s,
                tier,
                bad[0][1][1],
                "its mirror copy" if same_step_next else "the previous step",
            )
            last = err or IntegrityError(bad[0][1][1], step=s)
            failed.append((s, tier))
        assert last is not None
        raise last

    def _read_error(self, e: BaseException, step: int, tier: str) -> BaseException:
        err = _typed_os_error(e, f"step {step} could not be read from {self._tier(tier).url}")
        if err is not e:
            err.__cause__ = e
        return err

    def _outcomes(self, err: BaseException | None, what: str) -> list[tuple[int, tuple[str, str]]]:
        """Every rank's error of one phase, as (rank, (type name, message)); empty when all succeeded."""
        errs = self.comm.all_gather(None if err is None else (type(err).__name__, str(err)), what=what)
        return [(r, e) for r, e in enumerate(errs) if e is not None]

    @_gc_paused
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
        last: BaseException | None = None
        cands = self._candidates(step)
        failed: list[tuple[int, str]] = []
        for i, (s, tier) in enumerate(cands):
            try:
                try:
                    m = self._manifest(s, tier, any_generation=isinstance(step, int))
                    value = self._load_from(m, map_location, verify, trusted, self._tier(tier))
                    for bad_step, bad_tier in failed:
                        self._quarantine_if_damaged(bad_step, bad_tier)
                    return value
                except OSError as e:
                    typed = _typed_os_error(e, f"step {s} could not be read from {self._tier(tier).url}")
                    if typed is e:
                        raise
                    raise typed from e
            except (IntegrityError, ManifestError) as e:
                same_step_next = i + 1 < len(cands) and cands[i + 1][0] == s
                if step != "latest" and not same_step_next:
                    raise
                log.warning("step %d (%s tier) does not verify (%s); trying the next candidate", s, tier, e)
                last = e
                failed.append((s, tier))
        if last is not None:
            raise last
        raise CheckpointNotFoundError(f"no committed step under {self.url}")

    def _io_for(self, verify: bool | None) -> IOOptions:
        if verify is None or verify == self.io.verify:
            return self.io
        return replace(self.io, verify=verify)

    def _check_trust(self, m: Manifest, trusted: bool) -> None:
        if m.has_pickles and not trusted:
            keys = [k for k, t in m.tensors.items() if t.encoding == "pickle"]
            raise UnsafeCheckpointError(
                f"step {m.step} contains pickled objects ({', '.join(keys[:5])}); unpickling runs code from the "
                "checkpoint. Pass trusted=True only if you trust who wrote it"
            )

    def _load_from(
        self, m: Manifest, map_location: Any, verify: bool | None, trusted: bool, storage: Storage | None = None
    ) -> Any:
        self._check_trust(m, trusted)
        rc = _ReadCtx(m, map_location, self.comm.rank, storage, map_files=self.io.mmap_load)
        value = unflatten(m.tree, lambda key, node: self._fresh(rc, key), rank=self.comm.rank)
        io = self._io_for(verify)
        read_pieces(storage or self.storage, step_dir(m.step), rc.tasks, io, step=m.step)
        verify_views(rc.mapped, io, step=m.step)
        return self._finalize(rc, value)

    def _plan_restore(
        self,
        m: Manifest,
        state: Any,
        map_location: Any,
        strict: bool,
        trusted: bool,
        storage: Storage,
        dirty: dict[tuple[int, int], str],
    ) -> _ReadCtx:
        """Phase 1 of a restore: plan every read into ``state`` and every deferred change; nothing is changed.

        ``dirty`` holds target memory that earlier failed attempts overwrote; the plan is refused unless it sets
        all of it again, and what its own reads will overwrite is added."""
        self._check_trust(m, trusted)
        rc = _ReadCtx(m, map_location, self.comm.rank, storage)
        root = m.tree
        if is_stateful(state) or isinstance(state, torch.Tensor):
            self._into(rc, state, root, "", strict, top=True)
        elif isinstance(state, Mapping):
            items = _dict_items(root, "the checkpoint root")
            for k in state:
                if k not in items:
                    rc.missing.append(str(k))
                    continue
                new = self._into(rc, state[k], items[k], str(k), strict, top=False)
                if new is not state[k]:
                    rc.deferred.append(_setter(state, k, new, rc, self))
        else:
            raise StateMismatchError(
                f"restore() takes a dict of state (or a Stateful object), got {type(state).__name__}"
            )
        if rc.problems:
            raise StateMismatchError(
                f"step {m.step} does not fit the given state: " + "; ".join(rc.problems[:20]),
                missing=rc.missing,
                unexpected=rc.unexpected,
            )
        if strict and (rc.missing or rc.unexpected or rc.missing_per_rank):
            parts = []
            if rc.missing:
                parts.append(f"missing from the checkpoint: {', '.join(rc.missing[:20])}")
            if rc.unexpected:
                parts.append(f"unexpected in the checkpoint: {', '.join(rc.unexpected[:20])}")
            if rc.missing_per_rank:
                parts.append(
                    f"no saved PerRank value for rank {rc.rank} at {', '.join(rc.missing_per_rank[:20])} (saved at "
                    f"world size {m.world_size}, restored at {self.comm.world_size}); keep data positions in a "
                    "global cursor (ckptstore.elastic.ElasticSampler) to resume at another world size"
                )
            raise StateMismatchError(
                f"step {m.step} does not match the state (strict=True): "
                + "; ".join(parts)
                + ". Pass strict=False to restore what matches (PerRank values without a saved value are then "
                "left as they are and listed in the returned info's missing_per_rank)",
                missing=rc.missing + rc.missing_per_rank,
                unexpected=rc.unexpected,
            )
        left = [path for region, path in dirty.items() if region not in rc.covered]
        if left:
            shown = ", ".join(repr(p) for p in left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise StateMismatchError(
                f"cannot fall back to step {m.step}: a newer step that failed verification was already read "
                f"into {shown}, and step {m.step} has no value for them, so the state would mix two steps. "
                "Nothing else was changed; re-create these objects (or restore a step that has them) before "
                "training on",
                missing=left,
            )
        dirty.update(rc.written)
        return rc

    def _apply_restore(self, rc: _ReadCtx, verify: bool | None) -> None:
        """Phase 2 of a restore: read and verify every piece, then make the deferred changes."""
        assert rc.storage is not None
        read_pieces(rc.storage, step_dir(rc.manifest.step), rc.tasks, self._io_for(verify), step=rc.manifest.step)
        for fn in rc.deferred:
            fn()

    # The restore walk: register reads into existing tensors, create fresh values for the rest, and defer every
    # mutation of the caller's objects until all reads have been verified.
    def _into(self, rc: _ReadCtx, tgt: Any, node: Any, path: str, strict: bool, *, top: bool) -> Any:
        node = _unwrap(node, rc.rank)
        if isinstance(tgt, PerRank):
            if node is None:
                rc.missing_per_rank.append(path or "<root>")
                return tgt
            new_inner = self._into(rc, tgt.value, node, path, strict, top=False)
            rc.deferred.append(lambda: setattr(tgt, "value", self._finalize(rc, new_inner)))
            return tgt
        if isinstance(tgt, torch.Tensor):
            key = _tensor_key(node)
            if key is None:
                rc.problems.append(f"{path!r} is a tensor in the state but not in the checkpoint")
                return tgt
            self._fill_existing(rc, key, tgt, path)
            return tgt
        if is_stateful(tgt):
            self._into_stateful(rc, tgt, node, path, strict)
            return tgt
        if isinstance(tgt, dict):
            items = _dict_items(node, path, rc)
            if items is None:
                return tgt
            for k in list(tgt):
                if k not in items:
                    rc.missing.append(f"{path}/{k}")
                    continue
                new = self._into(rc, tgt[k], items[k], f"{path}/{k}", strict, top=False)
                if new is not tgt[k]:
                    rc.deferred.append(_setter(tgt, k, new, rc, self))
            for k, child in items.items():
                if k not in tgt:
                    rc.deferred.append(_setter(tgt, k, self._fresh_tree(rc, child), rc, self))
            return tgt
        if isinstance(tgt, list):
            vals = _seq_items(node, path, rc)
            if vals is None:
                return tgt
            if len(vals) != len(tgt):
                if strict:
                    rc.problems.append(f"{path!r} has {len(tgt)} items in the state, {len(vals)} in the checkpoint")
                    return tgt
            for i in range(min(len(vals), len(tgt))):
                new = self._into(rc, tgt[i], vals[i], f"{path}/{i}", strict, top=False)
                if new is not tgt[i]:
                    rc.deferred.append(_setter(tgt, i, new, rc, self))
            return tgt
        if isinstance(tgt, tuple) and not isinstance(tgt, torch.Size):
            vals = _seq_items(node, path, rc)
            if vals is None or len(vals) != len(tgt):
                if vals is not None:
                    rc.problems.append(f"{path!r} has {len(tgt)} items in the state, {len(vals)} in the checkpoint")
                return tgt
            return tuple(
                self._into(rc, t, v, f"{path}/{i}", strict, top=False) for i, (t, v) in enumerate(zip(tgt, vals))
            )
        return self._fresh_tree(rc, node)

    def _into_stateful(self, rc: _ReadCtx, obj: Any, node: Any, path: str, strict: bool) -> None:
        if isinstance(obj, torch.nn.Module):
            cur = obj.state_dict(keep_vars=True)
            items = _dict_items(node, path, rc)
            if items is None:
                return
            for k in cur:
                if k not in items:
                    rc.missing.append(f"{path}/{k}" if path else k)
            for k in items:
                if k not in cur:
                    rc.unexpected.append(f"{path}/{k}" if path else k)
            new_sd: dict[str, Any] = {}
            for k, v in cur.items():
                if k not in items:
                    continue
                if isinstance(v, torch.Tensor):
                    key = _tensor_key(_unwrap(items[k], rc.rank))
                    if key is None:
                        rc.problems.append(f"{path}/{k}: a tensor in the model, not in the checkpoint")
                        continue
                    self._fill_existing(rc, key, v.detach() if v.requires_grad else v, f"{path}/{k}")
                    new_sd[k] = v
                else:
                    new_sd[k] = _Pending(self._fresh_tree(rc, items[k]))
            for k in items:
                if k not in cur and not strict:
                    new_sd.setdefault(k, _Pending(self._fresh_tree(rc, items[k])))

            def load_module() -> None:
                sd = {k: (self._finalize(rc, v.value) if isinstance(v, _Pending) else v) for k, v in new_sd.items()}
                try:
                    obj.load_state_dict(sd, strict=strict)
                except RuntimeError as e:
                    raise StateMismatchError(f"{path or 'model'}: load_state_dict failed: {e}") from None

            rc.deferred.append(load_module)
            return
        # Optimizers, schedulers, GradScaler, user Stateful: build the full state dict from the checkpoint,
        # reading into tensors the object already has where paths and shapes line up.
        cur_sd = obj.state_dict()
        new_value = self._build(rc, node, cur_sd)

        def load_obj() -> None:
            sd = self._finalize(rc, new_value)
            try:
                obj.load_state_dict(sd)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise StateMismatchError(f"{path}: {type(obj).__name__}.load_state_dict failed: {e}") from None

        rc.deferred.append(load_obj)

    def _build(self, rc: _ReadCtx, node: Any, hint: Any) -> Any:
        node = _unwrap(node, rc.rank)
        if isinstance(node, dict) and node.get("t") == "dict":
            hint_d = hint if isinstance(hint, Mapping) else {}
            return {k: self._build(rc, v, hint_d.get(k)) for k, v in zip(node["k"], node["v"])}
        if isinstance(node, dict) and node.get("t") in ("list", "tuple"):
            hint_l = hint if isinstance(hint, (list, tuple)) else []
            vals = [self._build(rc, v, hint_l[i] if i < len(hint_l) else None) for i, v in enumerate(node["v"])]
            return vals if node["t"] == "list" else tuple(vals)
        key = _tensor_key(node)
        if key is not None and isinstance(hint, torch.Tensor):
            entry = rc.manifest.tensors.get(key)
            if entry is not None and entry.encoding == "raw" and tuple(hint.shape) == entry.shape:
                self._fill_existing(rc, key, hint.detach(), key)
                return hint
        return self._fresh_tree(rc, node)

    def _fresh_tree(self, rc: _ReadCtx, node: Any) -> Any:
        return unflatten(node, lambda key, n: self._fresh(rc, key), rank=rc.rank)

    def _entry(self, rc: _ReadCtx, key: str) -> TensorEntry:
        e = rc.manifest.tensors.get(key)
        if e is None:
            raise ManifestError(f"step {rc.manifest.step}: the state tree refers to {key!r}, absent from tensors")
        return e

    def _fresh(self, rc: _ReadCtx, key: str) -> torch.Tensor:
        e = self._entry(rc, key)
        dt = e.torch_dtype
        if e.encoding == "pickle":
            buf = self._alloc(rc, key, e, torch.uint8)
            rc.tasks.extend(plan_fill(key, e, buf))
            rc.pickles[id(buf)] = key
            return buf
        dev = _resolve_device(rc, key, e)
        if dev.type == "meta":
            return torch.empty(e.shape, dtype=dt, device="meta")
        if rc.map_files and dev.type == "cpu":
            mapped = self._map_piece(rc, key, e, dt)
            if mapped is not None:
                return mapped
        t = self._alloc(rc, key, e, dt)
        rc.tasks.extend(plan_fill(key, e, t))
        if dev.type != "cpu":
            rc.moves[id(t)] = dev
        return t

    def _map_piece(self, rc: _ReadCtx, key: str, e: TensorEntry, dt: torch.dtype) -> torch.Tensor | None:
        """A tensor viewing its bytes in a copy-on-write map of the shard file, or None (then it is read)."""
        if len(e.pieces) != 1:
            return None
        p = e.pieces[0]
        itemsize = dt.itemsize
        numel = math.prod(e.shape)
        if p.offsets is not None or not numel or p.nbytes != numel * itemsize or p.start % itemsize:
            return None
        if p.file not in rc.maps:
            try:
                rc.maps[p.file] = (rc.storage or self.storage).map_private(f"{step_dir(rc.manifest.step)}/{p.file}")
            except (OSError, ValueError):
                rc.maps[p.file] = None  # missing or unmappable: the read path reports it precisely
        mm = rc.maps[p.file]
        if mm is None:
            return None
        if p.end > len(mm):
            raise IntegrityError(
                f"step {rc.manifest.step}: file {p.file} is shorter than the manifest says ({len(mm)} bytes, "
                f"key {key!r} ends at {p.end})",
                step=rc.manifest.step,
                file=p.file,
                key=key,
            )
        t = torch.frombuffer(mm, dtype=dt, count=numel, offset=p.start).view(e.shape)
        rc.mapped.append((key, p, tensor_bytes(t)))
        return t

    def _alloc(self, rc: _ReadCtx, key: str, e: TensorEntry, dt: torch.dtype) -> torch.Tensor:
        """``torch.empty`` for a tensor the manifest describes. When that fails, a manifest claiming more bytes
        than its files hold (damaged or hostile) is reported as such, not as the allocator's RuntimeError."""
        try:
            return torch.empty(e.shape, dtype=dt)
        except (RuntimeError, MemoryError) as err:
            storage = rc.storage or self.storage
            prefix = step_dir(rc.manifest.step)
            for p in e.pieces:
                try:
                    size = storage.size(f"{prefix}/{p.file}")
                except OSError:
                    continue
                if size < p.end:
                    raise ManifestError(
                        f"step {rc.manifest.step}: tensor {key!r} ({dtype_name(dt)}{list(e.shape)}, {e.nbytes} bytes) "
                        f"claims bytes {p.start}-{p.end} of {p.file}, which holds {size}: the manifest is damaged; "
                        "nothing was allocated"
                    ) from None
            raise err

    def _fill_existing(self, rc: _ReadCtx, key: str, tgt: torch.Tensor, path: str) -> None:
        e = self._entry(rc, key)
        if e.encoding != "raw":
            rc.problems.append(f"{path!r} is a tensor in the state but a pickled object in the checkpoint")
            return
        local, gshape, offs = _tensor_local_box(tgt)
        if gshape != e.shape:
            rc.problems.append(f"{path!r}: shape {list(gshape)} in the state, {list(e.shape)} in the checkpoint")
            return
        if local.device.type == "meta":
            return
        dt = e.torch_dtype
        region = (local.data_ptr(), local.numel() * local.element_size())
        rc.covered.add(region)
        if local.device.type == "cpu" and local.is_contiguous() and local.dtype == dt:
            rc.written[region] = path
            rc.tasks.extend(plan_fill(key, e, local, offs))
            return
        # Different device, dtype or layout: read into a CPU temporary, copy once everything verified.
        tmp = torch.empty(tuple(local.shape), dtype=dt)
        rc.tasks.extend(plan_fill(key, e, tmp, offs))
        rc.deferred.append(lambda: local.copy_(tmp))

    def _finalize(self, rc: _ReadCtx, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) in rc.pickles:
                dev = rc.map_location if isinstance(rc.map_location, (str, torch.device)) else None
                # Trusted by the caller (checked in _check_trust): this is the one place ckptstore unpickles.
                return torch.load(_pyio.BytesIO(value.numpy().tobytes()), map_location=dev, weights_only=False)
            dev = rc.moves.get(id(value))
            return value.to(dev) if dev is not None else value
        if isinstance(value, dict):
            return {k: self._finalize(rc, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._finalize(rc, v) for v in value]
        if isinstance(value, tuple) and not isinstance(value, torch.Size):
            return tuple(self._finalize(rc, v) for v in value)
        return value

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
        p, self._pending = self._pending, None
        if p is None:
            return None
        if p._reported:
            p._future.exception()  # already surfaced to the caller through the PendingSave
            return None
        return p.wait()

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
            for ex in (self._executor, self._mirror_executor):
                if ex is not None:
                    ex.shutdown(wait=True)
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
        self._lock = threading.Lock()
        self._pending = None  # the parent's save: the parent commits it (or not), never the child
        self._executor = None
        self._mirror_executor = None
        self._mirror_futures = []
        self._mirror_backlog_checked = False  # the parent's queued uploads are re-checked from the storage
        self._restoring = set()
        self._staging = StagingPool(self.io.staging_budget_bytes)

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
        step = _check_step(step)
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
        return load_artifact(self.storage, _check_step(step), name, map_location=map_location)

    def artifacts(self, step: int) -> list[Any]:
        """The artifacts stored with committed ``step`` (``ArtifactInfo`` objects, by name)."""
        from .artifacts import list_artifacts

        step = _check_step(step)
        self._manifest(step)
        return list_artifacts(self.storage, step)


# -- helpers ------------------------------------------------------------------------------------------------
@dataclass
class _SaveJob:
    step: int
    tree: Any
    sources: dict[str, Source]
    specs: list[LocalSpec]
    epoch: int | None
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    created_at: float
    t0: float
    blocking_seconds: float | None = None
    prep_error: BaseException | None = None
    copy: overlap.Copy | None = None
    """Overlapped staging: training also waited ``copy.waited`` seconds for the copy in hooks."""
    lease: _Lease | None = None
    """Rank 0: the in-progress marker of this save (see :class:`_Lease`)."""
    generation: int = 1
    """Which generation of the step number this save commits (rank 0 decides; see :mod:`ckptstore.layout`)."""
    parent: tuple[int, int] | None = None
    """Rank 0: the (step, generation) this save continues from, recorded in the manifest."""


LEASE_PREFIX = ".saving-"
"""Name prefix of the lease file a running save keeps in its step directory (``.saving-<save_id>``)."""
LEASE_REFRESH_SECONDS = 30.0
LEASE_TTL_SECONDS = 120.0
"""A lease not refreshed for this long belongs to a save that died; gc then treats it as any leftover file."""


class _Lease:
    """Marks a save in progress for ``gc`` in other processes: a small file in the step directory, rewritten every
    ``LEASE_REFRESH_SECONDS`` until the save ends. gc treats it as stale once it is ``LEASE_TTL_SECONDS`` old, or
    at once when it names a process of gc's own host that no longer runs (a killed save)."""

    def __init__(self, storage: Storage, prefix: str, save_id: str) -> None:
        self._storage = storage
        self.rel = f"{prefix}/{LEASE_PREFIX}{save_id}"
        pid = os.getpid()
        self._body = {"save_id": save_id, "host": platform.node(), "pid": pid, "start": _proc_start(pid)}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> _Lease:
        """Write the lease (an ``OSError`` here fails the save: nothing of it is written yet) and keep it fresh."""
        # All or nothing (a kill mid-write must not leave a torn lease that gc cannot read and would respect for
        # its whole TTL), but never fsynced: a lease is a hint for gc, and a flush per save is not free (W2/W3).
        self._storage.write_hint(self.rel, self._payload())
        self._thread = threading.Thread(target=self._refresh, name="ckpt-lease", daemon=True)
        self._thread.start()
        return self

    def _payload(self) -> bytes:
        return json.dumps({**self._body, "heartbeat": time.time()}).encode()

    def _write(self) -> None:
        self._storage.write_hint(self.rel, self._payload())

    def _refresh(self) -> None:
        while not self._stopped.wait(LEASE_REFRESH_SECONDS):
            with self._lock:
                if self._stopped.is_set():
                    return
                try:
                    self._write()
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


class _PrepFailed:
    """Sent in place of a rank's tensor boxes when flattening/staging its state failed."""

    def __init__(self, e: BaseException) -> None:
        self.message = f"{type(e).__name__}: {e}"


def _lineage(generation: int, parent: tuple[int, int] | None) -> dict[str, Any]:
    up = None if parent is None else {"step": parent[0], "generation": parent[1]}
    return {"generation": generation, "parent": up}


def _replica_problems(step: int, all_specs: Sequence[Sequence[LocalSpec]]) -> tuple[str | None, dict[int, str]]:
    """(message, {rank: why}) when ranks hold different values for a tensor that would be written once."""
    bad = diverged_replicas(all_specs)
    if not bad:
        return None, {}
    failed: dict[int, str] = {}
    lines = []
    for key, by in list(bad.items())[:5]:
        groups = sorted(by.values(), key=lambda rs: (-len(rs), rs))  # the largest group first (ties: rank 0's)
        lines.append(f"{key!r}: " + " vs ".join("ranks " + ",".join(map(str, rs)) for rs in groups))
        for rs in groups[1:]:
            for r in rs:
                failed.setdefault(r, f"holds a different value of replicated tensor {key!r}")
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    msg = (
        f"step {step}: tensors saved as replicas (the same key and shape on every rank, written once) differ "
        f"between ranks: {'; '.join(lines)}{more}. Values that differ per rank on purpose (a ZeRO optimizer shard, "
        "a rank-local counter or EMA) must be wrapped in ckptstore.PerRank(...) or saved as DTensor shards; "
        "otherwise the replicas have diverged (check the gradient synchronisation). io.verify_replicas='off' "
        "skips this check"
    )
    return msg, failed


def _flat_nbytes(flat: Any) -> int:
    return sum(t.numel() * t.element_size() for t in flat.tensors.values())


class _Pending:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _setter(container: Any, k: Any, new: Any, rc: _ReadCtx, mgr: CheckpointManager) -> Callable[[], None]:
    def run() -> None:
        container[k] = mgr._finalize(rc, new)

    return run


def _unwrap(node: Any, rank: int) -> Any:
    while isinstance(node, dict):
        t = node.get("t")
        if t == "stateful":
            node = node.get("v")
        elif t == "per_rank":
            per = node.get("v") or {}
            node = per.get(str(rank))
        else:
            break
    return node


def _tensor_key(node: Any) -> str | None:
    if isinstance(node, dict) and node.get("t") == "tensor" and isinstance(node.get("key"), str):
        return node["key"]
    return None


def _dict_items(node: Any, path: str, rc: _ReadCtx | None = None) -> dict[Any, Any] | None:
    node = _unwrap(node, rc.rank if rc else 0)
    if isinstance(node, dict) and node.get("t") == "dict":
        return dict(zip(node["k"], node["v"]))
    msg = f"{path!r} is a dict in the state but not in the checkpoint"
    if rc is None:
        raise StateMismatchError(msg)
    rc.problems.append(msg)
    return None


def _seq_items(node: Any, path: str, rc: _ReadCtx) -> list[Any] | None:
    node = _unwrap(node, rc.rank)
    if isinstance(node, dict) and node.get("t") in ("list", "tuple"):
        return list(node["v"])
    rc.problems.append(f"{path!r} is a sequence in the state but not in the checkpoint")
    return None


def _remote_error(rank: int, kind: str, msg: str, step: int | None) -> CheckpointError:
    """The error another rank hit, re-created here so that every rank raises the same type."""
    from . import errors

    text = f"rank {rank}: {msg}"
    if kind in ("IntegrityError", "CheckpointNotFoundError", "CheckpointExistsError"):
        return getattr(errors, kind)(text, step=step)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, CheckpointError) and cls is not errors.DistributedSaveError:
        return cls(text)
    return DistributedSaveError(f"{text} ({kind})", failed_ranks={rank: f"{kind}: {msg}"})


def _merge_trees(trees: Sequence[Any]) -> Any:
    """Rank 0's tree, with every rank's per-rank subtrees merged in."""
    base = trees[0]
    if len(trees) == 1:
        return base

    def merge(a: Any, others: list[Any]) -> Any:
        if isinstance(a, dict):
            t = a.get("t")
            if t == "per_rank":
                merged = dict(a["v"])
                for o in others:
                    if isinstance(o, dict) and o.get("t") == "per_rank":
                        merged.update(o["v"])
                return {"t": "per_rank", "v": dict(sorted(merged.items(), key=lambda kv: int(kv[0])))}
            if t in ("dict", "list", "tuple"):
                kids = [o.get("v", []) if isinstance(o, dict) else [] for o in others]
                return {**a, "v": [merge(v, [k[i] for k in kids if i < len(k)]) for i, v in enumerate(a["v"])]}
            if t == "stateful":
                return {**a, "v": merge(a["v"], [o.get("v") for o in others if isinstance(o, dict)])}
        return a

    return merge(base, list(trees[1:]))


_TYPED_OS_ERRORS: dict[type, type] = {}


def _typed_os_error(e: BaseException, what: str) -> BaseException:
    """``e`` itself, or — for a raw ``OSError`` from the storage (ENOSPC, EIO, EFBIG, a reset connection...) — a
    :class:`StorageError` saying ``what`` happened, with the same ``errno``/``filename``, that is still an instance
    of ``e``'s built-in class (``except OSError`` / ``except PermissionError`` keep working)."""
    if not isinstance(e, OSError) or isinstance(e, CheckpointError):
        return e
    cls = StorageError
    if type(e) is not OSError:
        base = type(e)
        cls = _TYPED_OS_ERRORS.get(base)  # type: ignore[assignment]
        if cls is None:
            try:
                cls = type("StorageError", (StorageError, base), {"__module__": StorageError.__module__})
            except TypeError:  # an exotic OSError subclass that cannot be combined
                cls = StorageError
            _TYPED_OS_ERRORS[base] = cls
    err = cls(f"{what}: {type(e).__name__}: {e}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, e.filename
    return err


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise UnsupportedValueError(f"step must be an int from 0 to {MAX_STEP}, got {step!r}")
    return step


def _fmt_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[-10:])) + (" (newest 10)" if len(steps) > 10 else "")


def _age(entry: Any, now: float) -> float:
    """Seconds since ``entry`` (a storage ``Entry``) was modified. Where the storage cannot tell, 0: what cannot
    be aged may belong to a save in progress, so gc leaves it alone."""
    return 0.0 if entry.mtime is None else now - entry.mtime


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot, Linux) of process ``pid``, or None if it does not run: with the pid
    it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):  # a zombie: dead, only not yet reaped by its parent
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _kind(entry: Any) -> str:
    return "directory" if entry.kind == "dir" else "file" if entry.kind == "file" else "symbolic link or special file"


def _coerce_retention(retention: Any) -> Any:
    if retention is None:
        return None
    from .retention import coerce_retention

    return coerce_retention(retention)


def _device_ok(dev: torch.device) -> bool:
    if dev.type in ("cpu", "meta"):
        return True
    mod = getattr(torch, dev.type, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # some backends raise on is_available without drivers
        return False


def _resolve_device(rc: _ReadCtx, key: str, e: TensorEntry) -> torch.device:
    ml = rc.map_location
    saved = e.device
    dev: Any
    if ml is None:
        dev = saved
    elif isinstance(ml, (str, torch.device)):
        dev = ml
    elif isinstance(ml, Mapping):
        dev = ml.get(saved, ml.get(torch.device(saved), saved)) if saved else saved
    elif callable(ml):
        import inspect

        try:
            first = next(iter(inspect.signature(ml).parameters), "")
        except (TypeError, ValueError):
            first = ""
        if first == "key":
            dev = ml(key, torch.empty(e.shape, dtype=e.torch_dtype, device="meta"))
        else:  # torch.load convention: fn(storage, location) -> storage | None
            res = ml(torch.UntypedStorage(0), saved)
            dev = saved if res is None else getattr(res, "device", res)
    else:
        raise UnsupportedValueError(f"map_location must be None, str, torch.device, dict or callable, got {ml!r}")
    dev = torch.device(dev)
    if not _device_ok(dev):
        if str(dev) not in rc.warned_devices:
            log.warning("device %s is not available here; loading to cpu instead", dev)
            rc.warned_devices.add(str(dev))
        dev = torch.device("cpu")
    return dev
