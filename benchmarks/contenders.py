"""Benchmark contenders: the same three operations implemented by every checkpointing approach.

* ``save``    - write the workload's state to a directory (or an ``s3://`` prefix) and make it durable (every
  file fsynced, and the directory; an S3 object is durable once its PUT/CompleteMultipartUpload returned);
* ``restore`` - put a saved state back into an *existing* model/optimizer of the same shapes;
* ``load``    - read a saved state into fresh objects (the worker then reads every byte once, inside the timed
  region, so lazy/mmap loaders pay for their page faults).

Contenders (``--contenders``; options after ``:`` as ``key=value``, e.g. ``ckptstore:threads=2``):

=================  ===============================================================================================
``raw``            the physical limit: one file, a single stream of ``os.writev`` from tensor memory + fsync;
                   restore = ``os.preadv`` into the existing tensors; load = ``torch.empty`` + ``os.preadv``.
                   On S3: one object per tensor, all uploaded by one parallel s3fs ``fs.pipe`` (the bytes are
                   prepared before the timer: botocore needs ``bytes``) and read by one parallel ``fs.cat``
                   (restore copies them into the existing tensors; load wraps them with ``torch.frombuffer``)
``torch``          ``torch.save`` + fsync; ``torch.load`` (+ ``load_state_dict``)
``torch-mmap``     reads ``torch.save`` files with ``torch.load(mmap=True)`` (its save is not reported)
``safetensors``    ``safetensors.torch.save_file`` + fsync; ``load_file`` (+ ``load_state_dict``)
``dcp``            ``torch.distributed.checkpoint`` single process (``no_dist=True``), ``FileSystemWriter(
                   thread_count=threads, sync_files=True)`` (on S3 its ``FsspecWriter``/``FsspecReader`` with
                   the target's storage options); the tutorial's ``Stateful`` app state; ``dcp:threads=2``
                   reports only ``save`` (reading does not use the thread count)
``ckptstore``      ``CheckpointManager.save/restore/load``; options are ``IOOptions`` fields
=================  ===============================================================================================

W4 (2-rank save, 1-rank restore) uses :meth:`Contender.save_dict` / :meth:`Contender.restore_dict` on the
``get_state_dict`` recipe's ``{"model": msd, "optim": osd}`` (ckptstore and DCP); W5 (async save in a training
loop) uses :meth:`Contender.async_session` (ckptstore ``save(blocking=False)``, DCP ``async_save``).

Used by ``benchmarks.worker``; run the suite with ``python -m benchmarks.run``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .workloads import Workload

_IOV_MAX = 1024

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
# torch.frombuffer over the read-only bytes s3fs returns (raw S3 load): the tensors are only read.
warnings.filterwarnings("ignore", message=".*buffer is not writable.*")
# DCP's single-process load (no process group, by design here) says so on every call.
warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")


def is_url(loc: str) -> bool:
    return "://" in loc


def tensor_view(t: torch.Tensor) -> memoryview:
    """Flat byte view of a contiguous CPU tensor (no copy)."""
    t = t.detach()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (files were fsynced by the writer)."""
    for d, _, _ in os.walk(root):
        fsync_path(Path(d))


def parse_options(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, text.split(":")):
        if "=" not in part:
            raise ValueError(f"contender option {part!r} is not key=value")
        k, v = part.split("=", 1)
        val: Any = v
        if v.lower() in ("true", "false"):
            val = v.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    val = conv(v)
                    break
                except ValueError:
                    continue
        out[k] = val
    return out


class Contender:
    """Base class: ``label`` is the name in reports; ``ops`` are the reported operations."""

    kind = ""
    ops: tuple[str, ...] = ("save", "restore", "load")
    fs_only = True
    """Needs a local filesystem path (every contender but ckptstore)."""
    files_of: str | None = None
    """Reads the files another contender kind writes (when that one runs in the same round)."""

    dist_ok = False
    """Saves from several ranks and restores at another world size (W4)."""
    async_ok = False
    """Has an asynchronous save (W5)."""

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        self.label = label
        self.options = options

    storage_options: dict[str, Any] | None = None
    """Set by the worker for URL targets (e.g. the S3 endpoint)."""

    def prepare(self, wl: Workload | None, op: str, loc: str) -> None:
        """Called before the timer and the RSS baseline (e.g. to convert tensors to the ``bytes`` botocore needs)."""

    def save(self, wl: Workload, loc: str) -> None:
        raise NotImplementedError

    def restore(self, wl: Workload, loc: str) -> None:
        raise NotImplementedError

    def load(self, loc: str) -> Any:
        raise NotImplementedError

    def save_dict(self, state: dict[str, Any], loc: str) -> None:
        """W4: save a (possibly DTensor-sharded) state dict from every rank of the default process group."""
        raise NotImplementedError

    def restore_dict(self, state: dict[str, Any], loc: str) -> None:
        """W4: fill the tensors of ``state`` in place from a checkpoint saved at another world size."""
        raise NotImplementedError

    def async_session(self, wl: Workload, loc: str) -> AsyncSession:
        """W5: synchronous and asynchronous saves of ``wl`` to fresh steps under ``loc``, sharing resources."""
        raise NotImplementedError


class AsyncSession:
    """W5: ``sync_save(step)`` returns when durable; ``async_save(step)`` returns a handle with ``done()`` and
    ``wait()`` once the state may be modified again; ``close()`` releases staging memory and threads."""

    def sync_save(self, step: int) -> None:
        raise NotImplementedError

    def async_save(self, step: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


_WB_BYTES = 32 << 20


def _sync_file_range(fd: int, offset: int, nbytes: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    libc.sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start write-back, do not wait


class Raw(Contender):
    """``raw:writeback=true`` also starts write-back every 32 MiB (``sync_file_range``), still one stream.

    On S3 (``s3://`` locations): one object per tensor plus ``layout.json``, uploaded with one parallel s3fs
    ``fs.pipe`` and read with one parallel ``fs.cat`` (what ``benchmarks/bench_s3.py`` calls raw put/get).
    """

    kind = "raw"
    fs_only = False

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        super().__init__(label, options)
        self.writeback = bool(options.get("writeback", False))
        if self.writeback:
            self.ops = ("save",)
        self._blobs: dict[str, bytes] | None = None

    # -- S3: the simple parallel approach -------------------------------------------------------------------
    @staticmethod
    def _layout(wl: Workload) -> list[list[Any]]:
        return [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in wl.flat().items()]

    @staticmethod
    def _object_urls(loc: str, n: int) -> list[str]:
        return [f"{loc}/t{i:06d}" for i in range(n)]

    def prepare(self, wl: Workload | None, op: str, loc: str) -> None:
        if is_url(loc) and op == "save" and wl is not None:
            # botocore only takes bytes/bytearray/file objects; the copy is made before the timer so that raw
            # measures the transfer alone (as bench_s3.py does), which only makes ckptstore's ratio harder.
            flat = list(wl.flat().values())
            self._blobs = {u: tensor_view(v).tobytes() for u, v in zip(self._object_urls(loc, len(flat)), flat)}
            self._blobs[f"{loc}/layout.json"] = json.dumps(self._layout(wl)).encode()

    def _s3_save(self, wl: Workload, loc: str) -> None:
        from .s3util import raw_put

        assert self._blobs is not None, "prepare() was not called"
        raw_put(self.storage_options, self._blobs)

    def _s3_fetch(self, loc: str, n: int) -> list[bytes]:
        from .s3util import raw_get

        urls = self._object_urls(loc, n)
        got = raw_get(self.storage_options, urls)
        return [got[u] for u in urls]

    def save(self, wl: Workload, loc: str) -> None:
        if is_url(loc):
            return self._s3_save(wl, loc)
        d = Path(loc)
        d.mkdir(parents=True, exist_ok=True)
        flat = wl.flat()
        layout = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in flat.items()]
        (d / "layout.json").write_text(json.dumps(layout))
        fsync_path(d / "layout.json")
        fd = os.open(d / "data.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            bufs = [b for b in (tensor_view(v) for v in flat.values()) if b.nbytes]
            if self.writeback:
                # Same single stream, but start write-back every ~32 MiB (what ckptstore's local writer does).
                bufs = [b[a : a + _WB_BYTES] for b in bufs for a in range(0, b.nbytes, _WB_BYTES)]
            i = pos = flushed = 0
            while i < len(bufs):
                batch = bufs[i : i + _IOV_MAX]
                if self.writeback:
                    size, k = 0, 0
                    while k < len(batch) and (k == 0 or size + batch[k].nbytes <= _WB_BYTES):
                        size += batch[k].nbytes
                        k += 1
                    batch = batch[:k]
                n = os.writev(fd, batch)
                pos += n
                while n and n >= bufs[i].nbytes:
                    n -= bufs[i].nbytes
                    i += 1
                if n:
                    bufs[i] = bufs[i][n:]
                if self.writeback and pos - flushed >= _WB_BYTES:
                    _sync_file_range(fd, flushed, pos - flushed)
                    flushed = pos
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(d)

    @staticmethod
    def _read_into(path: Path, bufs: list[memoryview]) -> None:
        bufs = [b for b in bufs if b.nbytes]
        fd = os.open(path, os.O_RDONLY)
        try:
            pos, i = 0, 0
            while i < len(bufs):
                n = os.preadv(fd, bufs[i : i + _IOV_MAX], pos)
                if n == 0:
                    raise EOFError(f"{path} is shorter than expected")
                pos += n
                while n and n >= bufs[i].nbytes:
                    n -= bufs[i].nbytes
                    i += 1
                if n:
                    bufs[i] = bufs[i][n:]
        finally:
            os.close(fd)

    def restore(self, wl: Workload, loc: str) -> None:
        if is_url(loc):
            dst = list(wl.flat().values())
            for t, b in zip(dst, self._s3_fetch(loc, len(dst))):
                tensor_view(t)[:] = b  # s3fs has no read-into: copy each object into its tensor
            return
        d = Path(loc)
        self._read_into(d / "data.bin", [tensor_view(v) for v in wl.flat().values()])

    def load(self, loc: str) -> Any:
        if is_url(loc):
            from .s3util import fs_for

            layout = json.loads(fs_for(self.storage_options).cat_file(f"{loc}/layout.json"))
            blobs = self._s3_fetch(loc, len(layout))
            out: dict[str, torch.Tensor] = {}
            for (k, dt, shape), b in zip(layout, blobs):
                dtype = getattr(torch, dt)
                out[k] = torch.frombuffer(b, dtype=dtype).reshape(shape) if b else torch.empty(shape, dtype=dtype)
            return out
        d = Path(loc)
        layout = json.loads((d / "layout.json").read_text())
        out = {k: torch.empty(shape, dtype=getattr(torch, dt)) for k, dt, shape in layout}
        self._read_into(d / "data.bin", [tensor_view(v) for v in out.values()])
        return out


class TorchSave(Contender):
    kind = "torch"

    def save(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "ckpt.pt", "wb") as f:
            torch.save(wl.torch_state(), f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(d)

    def restore(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        wl.apply_torch_state(torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True))

    def load(self, loc: str) -> Any:
        d = Path(loc)
        return torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True)


class TorchMmap(TorchSave):
    kind = "torch-mmap"
    ops = ("restore", "load")
    files_of = "torch"

    def restore(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        wl.apply_torch_state(torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True))

    def load(self, loc: str) -> Any:
        d = Path(loc)
        return torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)


class Safetensors(Contender):
    kind = "safetensors"

    def save(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        from safetensors.torch import save_file

        d.mkdir(parents=True, exist_ok=True)
        path = d / "model.safetensors"
        save_file(wl.flat(), str(path), metadata=wl.flat_metadata() or None)
        fsync_path(path)
        fsync_path(d)

    def restore(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = str(d / "model.safetensors")
        meta: dict[str, str] | None = None
        if wl.optim is not None:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
        wl.apply_flat(load_file(path), meta)

    def load(self, loc: str) -> Any:
        d = Path(loc)
        from safetensors.torch import load_file

        return load_file(str(d / "model.safetensors"))


class DCP(Contender):
    """``torch.distributed.checkpoint``; ``FileSystemWriter``/``Reader`` on disk, ``FsspecWriter``/``Reader`` on
    URL targets (S3), ``thread_count=threads`` for writing."""

    kind = "dcp"
    fs_only = False
    dist_ok = True
    async_ok = True

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        super().__init__(label, options)
        self.threads = int(options.get("threads", 1))
        if self.threads != 1:
            self.ops = ("save",)

    def _writer(self, loc: str) -> Any:
        if is_url(loc):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            return FsspecWriter(loc, thread_count=self.threads, sync_files=True, **(self.storage_options or {}))
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(loc, thread_count=self.threads, sync_files=True)

    def _reader(self, loc: str) -> Any:
        if is_url(loc):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            return FsspecReader(loc, **(self.storage_options or {}))
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(loc)

    @staticmethod
    def _fsync(loc: str) -> None:
        # FileSystemWriter fsyncs its files (sync_files=True) but not the directories that name them.
        if not is_url(loc):
            fsync_tree(Path(loc))

    def save(self, wl: Workload, loc: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save({"app": wl.dcp_app()}, storage_writer=self._writer(loc), no_dist=True)
        self._fsync(loc)

    def restore(self, wl: Workload, loc: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load({"app": wl.dcp_app()}, storage_reader=self._reader(loc), no_dist=True)

    def load(self, loc: str) -> Any:
        # No public "load without a template" API in DCP; this private helper builds the template from metadata.
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        if is_url(loc):
            return _load_state_dict_from_keys(storage_reader=self._reader(loc))
        return _load_state_dict_from_keys(checkpoint_id=loc)

    def save_dict(self, state: dict[str, Any], loc: str) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=self._writer(loc), no_dist=not dist.is_initialized())
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._fsync(loc)

    def restore_dict(self, state: dict[str, Any], loc: str) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dcp.load(state, storage_reader=self._reader(loc), no_dist=not dist.is_initialized())

    def async_session(self, wl: Workload, loc: str) -> AsyncSession:
        return _DCPAsync(self, wl, loc)


class _DCPAsync(AsyncSession):
    """``dcp.async_save`` with one user-owned ``DefaultStager`` reused across saves.

    The stager keeps its CPU staging copies between saves (the fair counterpart of ckptstore's reused staging
    buffers). Pinned/shared memory, background staging and non-blocking copies need an accelerator, so all four
    ``StagingOptions`` are off on CPU; ``FileSystemWriter(cache_staged_state_dict=True)`` (the other reuse
    switch) pins memory and fails without one.
    """

    def __init__(self, c: DCP, wl: Workload, loc: str) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.c, self.wl, self.loc = c, wl, loc
        self.stager = DefaultStager(StagingOptions(False, False, False, False))

    def _state(self) -> dict[str, Any]:
        return {"app": self.wl.dcp_app()}

    def sync_save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        path = f"{self.loc}/step-{step}"
        dcp.save(self._state(), storage_writer=self.c._writer(path), no_dist=True)
        self.c._fsync(path)

    def async_save(self, step: int) -> Any:
        import torch.distributed.checkpoint as dcp

        path = f"{self.loc}/step-{step}"
        fut = dcp.async_save(self._state(), storage_writer=self.c._writer(path), async_stager=self.stager, no_dist=True)
        return _FutureHandle(fut, lambda: self.c._fsync(path))

    def close(self) -> None:
        self.stager.close()


class _FutureHandle:
    """``done()``/``wait()`` over a ``concurrent.futures.Future`` (or DCP's ``AsyncSaveResponse``)."""

    def __init__(self, fut: Any, after: Callable[[], None] | None = None) -> None:
        # torch may return an AsyncSaveResponse holding the upload future; plain Future otherwise.
        self.fut = getattr(fut, "upload_completion", fut)
        self.after = after

    def done(self) -> bool:
        return bool(self.fut.done())

    def wait(self) -> Any:
        res = self.fut.result()
        if self.after is not None:
            self.after()
        return res


class Ckptstore(Contender):
    """``CheckpointManager``; options are ``IOOptions`` fields plus benchmark-only switches:

    * ``nogc=true`` - disable Python's cyclic GC during the operation (measures that proposal);
    * ``overlap=true`` - ``CheckpointManager(overlap_staging=True)`` (W5).

    Before/after comparisons of library changes run the benchmark at both git revisions (two worktrees), not by
    patching the library's modules in one process.
    """

    kind = "ckptstore"
    fs_only = False
    dist_ok = True
    async_ok = True

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        super().__init__(label, options)
        from ckptstore.options import IOOptions

        opts = dict(options)
        self.nogc = bool(opts.pop("nogc", False))
        self.overlap = bool(opts.pop("overlap", False))  # W5: CheckpointManager(overlap_staging=True)
        self.io = IOOptions(**opts)

    def _mgr(self, loc: str) -> Any:
        from ckptstore import CheckpointManager

        return CheckpointManager(loc, io=self.io, storage_options=self.storage_options, overlap_staging=self.overlap)

    def _gc_off(self) -> Any:
        import contextlib
        import gc

        @contextlib.contextmanager
        def off() -> Any:
            was = gc.isenabled()
            gc.disable()
            try:
                yield
            finally:
                if was:
                    gc.enable()

        return off() if self.nogc else contextlib.nullcontext()

    def save(self, wl: Workload, loc: str) -> None:
        with self._gc_off(), self._mgr(loc) as mgr:
            mgr.save(1, wl.ckpt_state())

    def restore(self, wl: Workload, loc: str) -> None:
        with self._gc_off(), self._mgr(loc) as mgr:
            mgr.restore(wl.ckpt_state(), step=1)

    def load(self, loc: str) -> Any:
        with self._gc_off(), self._mgr(loc) as mgr:
            return mgr.load(step=1)

    def save_dict(self, state: dict[str, Any], loc: str) -> None:
        with self._gc_off(), self._mgr(loc) as mgr:  # the default process group: every rank writes its part
            mgr.save(1, state)

    def restore_dict(self, state: dict[str, Any], loc: str) -> None:
        with self._gc_off(), self._mgr(loc) as mgr:
            mgr.restore(state, step=1)

    def async_session(self, wl: Workload, loc: str) -> AsyncSession:
        return _CkptAsync(self._mgr(loc), wl)


class _CkptAsync(AsyncSession):
    """One manager for the whole loop, as in training: its staging buffers are reused from save to save."""

    def __init__(self, mgr: Any, wl: Workload) -> None:
        self.mgr, self.wl = mgr, wl

    def sync_save(self, step: int) -> None:
        self.mgr.save(step, self.wl.ckpt_state())

    def async_save(self, step: int) -> Any:
        return self.mgr.save(step, self.wl.ckpt_state(), blocking=False)  # PendingSave: done() / wait()

    def close(self) -> None:
        self.mgr.close()


KINDS: dict[str, type[Contender]] = {c.kind: c for c in (Raw, TorchSave, TorchMmap, Safetensors, DCP, Ckptstore)}
DEFAULT_CONTENDERS = ("raw", "torch", "torch-mmap", "safetensors", "dcp", "dcp:threads=2", "ckptstore")


def make_contender(spec: str) -> Contender:
    """``"ckptstore:threads=2"`` -> a Ckptstore contender labelled ``ckptstore:threads=2``."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown contender {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind](spec, parse_options(rest))
