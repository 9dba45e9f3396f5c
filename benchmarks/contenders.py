"""Benchmark contenders: the same three operations implemented by every checkpointing approach.

* ``save``    - write the workload's state to a directory and make it durable (every file fsynced, and the
  directory);
* ``restore`` - put a saved state back into an *existing* model/optimizer of the same shapes;
* ``load``    - read a saved state into fresh objects (the worker then reads every byte once, inside the timed
  region, so lazy/mmap loaders pay for their page faults).

Contenders (``--contenders``; options after ``:`` as ``key=value``, e.g. ``ckptstore:threads=2``):

=================  ===============================================================================================
``raw``            the physical limit: one file, a single stream of ``os.writev`` from tensor memory + fsync;
                   restore = ``os.preadv`` into the existing tensors; load = ``torch.empty`` + ``os.preadv``
``torch``          ``torch.save`` + fsync; ``torch.load`` (+ ``load_state_dict``)
``torch-mmap``     reads ``torch.save`` files with ``torch.load(mmap=True)`` (its save is not reported)
``safetensors``    ``safetensors.torch.save_file`` + fsync; ``load_file`` (+ ``load_state_dict``)
``dcp``            ``torch.distributed.checkpoint`` single process (``no_dist=True``), ``FileSystemWriter(
                   thread_count=threads, sync_files=True)``; the tutorial's ``Stateful`` app state;
                   ``dcp:threads=2`` reports only ``save`` (reading does not use the thread count)
``ckptstore``      ``CheckpointManager.save/restore/load``; options are ``IOOptions`` fields
=================  ===============================================================================================

Used by ``benchmarks.worker``; run the suite with ``python -m benchmarks.run``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .workloads import Workload

_IOV_MAX = 1024

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


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

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        self.label = label
        self.options = options

    storage_options: dict[str, Any] | None = None
    """Set by the worker for URL targets (e.g. the S3 endpoint)."""

    def save(self, wl: Workload, loc: str) -> None:
        raise NotImplementedError

    def restore(self, wl: Workload, loc: str) -> None:
        raise NotImplementedError

    def load(self, loc: str) -> Any:
        raise NotImplementedError


_WB_BYTES = 32 << 20


def _sync_file_range(fd: int, offset: int, nbytes: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    libc.sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start write-back, do not wait


class Raw(Contender):
    """``raw:writeback=true`` also starts write-back every 32 MiB (``sync_file_range``), still one stream."""

    kind = "raw"

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        super().__init__(label, options)
        self.writeback = bool(options.get("writeback", False))
        if self.writeback:
            self.ops = ("save",)

    def save(self, wl: Workload, loc: str) -> None:
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
        d = Path(loc)
        self._read_into(d / "data.bin", [tensor_view(v) for v in wl.flat().values()])

    def load(self, loc: str) -> Any:
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
    kind = "dcp"

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        super().__init__(label, options)
        self.threads = int(options.get("threads", 1))
        if self.threads != 1:
            self.ops = ("save",)

    def save(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        writer = FileSystemWriter(str(d), thread_count=self.threads, sync_files=True)
        dcp.save({"app": wl.dcp_app()}, storage_writer=writer, no_dist=True)
        fsync_tree(d)

    def restore(self, wl: Workload, loc: str) -> None:
        d = Path(loc)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        dcp.load({"app": wl.dcp_app()}, storage_reader=FileSystemReader(str(d)), no_dist=True)

    def load(self, loc: str) -> Any:
        d = Path(loc)
        # No public "load without a template" API in DCP; this private helper builds the template from metadata.
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        return _load_state_dict_from_keys(checkpoint_id=str(d))


def _swap_hot_paths(impl: str) -> None:
    """Use another version of ``ckptstore/io.py`` and ``ckptstore/storage/local.py`` in this process.

    ``impl`` is a git revision (``HEAD``: the committed files) or a directory holding ``io.py`` and/or
    ``storage/local.py``. For before/after comparisons of hot-path changes in the same run.
    """
    import importlib.util
    import subprocess
    import sys

    import ckptstore.manager
    import ckptstore.storage.local

    from .targets import REPO

    def source(rel: str) -> str | None:
        p = Path(impl) / rel
        if p.is_dir() or Path(impl).is_dir():
            return p.read_text() if p.exists() else None
        r = subprocess.run(["git", "show", f"{impl}:ckptstore/{rel}"], cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(f"impl={impl}: cannot read ckptstore/{rel}: {r.stderr.strip()}")
        return r.stdout

    def load(name: str, text: str) -> Any:
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = name.rpartition(".")[0]
        sys.modules[name] = mod
        exec(compile(text, f"<{impl}:{name}>", "exec"), mod.__dict__)
        return mod

    io_src = source("io.py")
    if io_src is not None:
        alt = load("ckptstore._bench_alt_io", io_src)
        for name in ("ReadTask", "Source", "plan_fill", "read_pieces", "write_files"):
            if hasattr(ckptstore.manager, name):
                setattr(ckptstore.manager, name, getattr(alt, name))
    local_src = source("storage/local.py")
    if local_src is not None:
        alt_local = load("ckptstore.storage._bench_alt_local", local_src)
        ckptstore.storage.local.LocalStorage = alt_local.LocalStorage  # type: ignore[misc]


class Ckptstore(Contender):
    """``CheckpointManager``; options are ``IOOptions`` fields plus two benchmark-only switches:

    * ``impl=REV|DIR`` - run with ``io.py``/``storage/local.py`` from a git revision or a directory (A/B);
    * ``nogc=true`` - disable Python's cyclic GC during the operation (measures that proposal);
    * ``proto=NAME`` - a prototype of a proposed change from ``benchmarks/prototypes.py`` (e.g. ``mmap_load``).
    """

    kind = "ckptstore"
    fs_only = False

    def __init__(self, label: str, options: dict[str, Any]) -> None:
        super().__init__(label, options)
        from ckptstore.options import IOOptions

        opts = dict(options)
        self.impl: str | None = opts.pop("impl", None)
        self.nogc = bool(opts.pop("nogc", False))
        self.proto: str | None = opts.pop("proto", None)
        self.io = IOOptions(**opts)
        self._swapped = False

    def _mgr(self, loc: str) -> Any:
        from ckptstore import CheckpointManager

        if not self._swapped:
            if self.impl:
                _swap_hot_paths(str(self.impl))
            if self.proto:
                from .prototypes import apply

                apply(str(self.proto))
            self._swapped = True
        return CheckpointManager(loc, io=self.io, storage_options=self.storage_options)

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


KINDS: dict[str, type[Contender]] = {c.kind: c for c in (Raw, TorchSave, TorchMmap, Safetensors, DCP, Ckptstore)}
DEFAULT_CONTENDERS = ("raw", "torch", "torch-mmap", "safetensors", "dcp", "dcp:threads=2", "ckptstore")


def make_contender(spec: str) -> Contender:
    """``"ckptstore:threads=2"`` -> a Ckptstore contender labelled ``ckptstore:threads=2``."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown contender {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind](spec, parse_options(rest))
