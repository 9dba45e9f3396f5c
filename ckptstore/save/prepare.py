"""State -> what a save writes: the flattened tree, each tensor's local box, staging copies and specs.

:class:`Preparer` holds the staging pool (reused host buffers for async saves). :meth:`Preparer.job` makes the
:class:`SaveJob` of a blocking or staged save in one pass over the tensors; overlapped staging takes the cheap part
now (:meth:`Preparer.overlap_begin`) and the rest on a background thread (:meth:`Preparer.sources`), watched by
autograd's version counters (:func:`check_unchanged`).

Example::

    prep = Preparer(io, comm.is_distributed)
    job = prep.job(SaveJob.new(7, epoch=None, metrics={}, metadata={}), prep.flatten(state, rank=0), stage=False)
"""

from __future__ import annotations

import io as _pyio
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import overlap
from ..errors import StateChangedError
from ..format.manifest import dtype_name
from ..format.state import Flat, flatten
from ..io import Box, Source, _parallel, sample_crc, tensor_bytes, tensor_local_box
from ..options import IOOptions
from ..plan import LocalSpec
from ..staging import StagingPool

log = logging.getLogger("ckptstore")


@dataclass
class SaveJob:
    """One save, from the caller's thread to the commit."""

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
    """This rank could not prepare its state: it still takes part in the protocol, so the others learn of it."""
    copy: overlap.Copy | None = None
    """Overlapped staging: training also waited ``copy.waited`` seconds for the copy in hooks."""

    @classmethod
    def new(cls, step: int, *, epoch: int | None, metrics: dict[str, Any], metadata: dict[str, Any]) -> SaveJob:
        return cls(step, None, {}, [], epoch, metrics, metadata, time.time(), time.perf_counter())


def pickle_tensor(obj: Any) -> torch.Tensor:
    buf = _pyio.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def version_of(t: torch.Tensor) -> int | None:
    """Autograd's in-place change counter of ``t`` (None for inference tensors, which have none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def check_unchanged(step: int, boxes: dict[str, Box], versions: dict[str, int | None]) -> None:
    changed = [k for k, v in versions.items() if v is not None and version_of(boxes[k][0]) != v]
    if changed:
        shown = ", ".join(repr(k) for k in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise StateChangedError(
            f"step {step} was not saved: {shown} changed in place while the overlapped staging copy was running, "
            "so the snapshot could mix old and new values. Call pending.wait_staged() before changing state "
            "outside optimizer.step() and module forwards, or use overlap_staging=False"
        )


def flat_nbytes(flat: Flat) -> int:
    return sum(t.numel() * t.element_size() for t in flat.tensors.values())


@dataclass
class Overlapped:
    """What overlapped staging took at call time; the rest is copied by :meth:`Preparer.sources` later."""

    flat: Flat
    boxes: dict[str, Box]
    versions: dict[str, int | None]
    pickled: dict[str, torch.Tensor]
    early: dict[str, torch.Tensor]


class Preparer:
    """Turns state into sources and specs; owns the staging buffers reused from save to save."""

    def __init__(self, io: IOOptions, distributed: bool) -> None:
        self.io = io
        self.distributed = distributed
        self.staging = StagingPool(io.staging_budget_bytes)

    def after_fork(self) -> None:
        self.staging = StagingPool(self.io.staging_budget_bytes)

    @staticmethod
    def flatten(state: Any, *, rank: int, allow_pickle: bool) -> Flat:
        return flatten(state, rank=rank, allow_pickle=allow_pickle)

    def prepare(
        self, job: SaveJob, state: Any, *, rank: int, allow_pickle: bool, blocking: bool, overlapped: bool
    ) -> tuple[bool, Overlapped | None]:
        """Fill ``job`` from ``state``; returns whether the save runs blocking, and for an overlapped save the part
        still to copy. An async save over the staging budget runs blocking. In a distributed job a failure is
        kept in ``job.prep_error`` and the save runs blocking: this rank still takes part in the protocol, so the
        others learn of it at once instead of waiting for a collective it would never join."""
        try:
            flat = self.flatten(state, rank=rank, allow_pickle=allow_pickle)
            if not blocking and not self.staging.fits(flat_nbytes(flat)):
                log.warning(
                    "step %d: state (%.1f MiB) exceeds the staging budget (%.1f MiB); saving synchronously",
                    job.step,
                    flat_nbytes(flat) / 2**20,
                    (self.io.staging_budget_bytes or 0) / 2**20,
                )
                blocking = True
            if not blocking and overlapped:
                return False, self.overlap_begin(job, flat)
            self.job(job, flat, stage=not blocking)
        except Exception as e:
            if not self.distributed:
                raise
            job.prep_error = e
            return True, None
        return blocking, None

    def job(self, job: SaveJob, flat: Flat, *, stage: bool) -> SaveJob:
        """``job`` with its tree, sources and specs (staged into host buffers when ``stage``)."""
        job.tree = flat.tree
        job.sources, job.specs = self.sources(flat, stage=stage)
        return job

    def overlap_begin(self, job: SaveJob, flat: Flat) -> Overlapped:
        """Only what is cheap is taken now: small tensors (buffers that forwards change, compiled ones too). The
        rest is copied while the next forward/backward runs, watched by version counter."""
        job.tree = flat.tree
        boxes = self.boxes(flat)
        early = {k: self.staging.stage(k, b[0]) for k, b in boxes.items() if overlap.is_small(b[0])}
        versions = {k: version_of(b[0]) for k, b in boxes.items() if k not in early}
        pickled = {k: pickle_tensor(o) for k, o in flat.pickles.items()}
        return Overlapped(flat, boxes, versions, pickled, early)

    def overlap_finish(self, job: SaveJob, ov: Overlapped) -> None:
        """On the background thread: copy the rest, then check nothing changed meanwhile."""
        job.sources, job.specs = self.sources(ov.flat, stage=True, boxes=ov.boxes, pickled=ov.pickled, staged=ov.early)
        check_unchanged(job.step, ov.boxes, ov.versions)

    @staticmethod
    def boxes(flat: Flat) -> dict[str, Box]:
        return {key: tensor_local_box(t.detach()) for key, t in flat.tensors.items()}

    def _stage_all(self, boxes: dict[str, Box], staged: dict[str, torch.Tensor], stage: bool) -> None:
        todo = [(k, b[0]) for k, b in boxes.items() if k not in staged and (stage or b[0].device.type != "cpu")]
        if not todo:
            return

        # A snapshot in reused host buffers: later training steps cannot change what gets written, and no fresh
        # memory is touched after the first save. Copies run on the I/O threads (torch releases the GIL), since
        # the caller is blocked for exactly this long. Plain threads, not an executor: an overlapped copy may
        # still run while the interpreter exits, when executors refuse new work.
        def stage_one(kv: tuple[str, torch.Tensor]) -> None:
            staged[kv[0]] = self.staging.stage(*kv)

        _parallel(stage_one, todo, self.io.threads, name="ckpt-stage")

    def sources(
        self,
        flat: Flat,
        *,
        stage: bool,
        boxes: dict[str, Box] | None = None,
        pickled: dict[str, torch.Tensor] | None = None,
        staged: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, Source], list[LocalSpec]]:
        """Sources and specs of ``flat``, in one pass; ``staged`` holds tensors already copied to staging."""
        staged = dict(staged or {})
        if boxes is None:
            boxes = self.boxes(flat)
        self._stage_all(boxes, staged, stage)
        sources: dict[str, Source] = {}
        specs: list[LocalSpec] = []
        # Per-dtype and per-device strings computed once: states hold 10k+ tensors of a few dtypes/devices.
        dtypes: dict[torch.dtype, tuple[str, int]] = {}
        devices: dict[torch.device, str] = {}
        # Whole tensors are written once for all ranks: fingerprint them so rank 0 can tell diverged replicas.
        check = self.io.verify_replicas if self.distributed else "off"
        order = 0
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
            raw = pickled[key] if pickled is not None else pickle_tensor(obj)
            sources[key] = Source(raw, (0,), torch.uint8, "pickle")
            specs.append(LocalSpec(key, "uint8", 1, (raw.numel(),), (0,), (raw.numel(),), order, "pickle"))
            order += 1
        self.staging.synchronize()
        if stage:
            self.staging.retain(set(flat.tensors))
        return sources, specs
