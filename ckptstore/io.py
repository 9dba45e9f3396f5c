"""I/O layer: executes write plans and read requests against a Storage, with checksums and threads.

Writes stream straight from tensor memory (``memoryview`` over the tensor's bytes, ``writev`` locally) — no
pickle and no in-memory copy of a shard. Reads land straight in the destination tensor's storage whenever
the stored piece is a contiguous region of it, which is the common case (same shapes, row-sharded tensors).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import crc32c as _crc
import torch

from .errors import IntegrityError
from .format.manifest import Piece, TensorEntry
from .format.safetensors import HeaderEntry, build_header, st_dtype_and_shape
from .options import IOOptions
from .plan import FilePlan, WriteItem
from .storage.base import Storage

log = logging.getLogger("ckptstore")

_BATCH_BYTES = 64 << 20


def crc32c(buf: memoryview | bytes, value: int = 0) -> int:
    """crc32c; releases the GIL on large buffers so threads checksum in parallel."""
    return int(_crc.crc32c(buf, value))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


@dataclass(frozen=True)
class Source:
    """Where a rank's bytes for one key come from: a contiguous CPU tensor holding the box at ``offsets``."""

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    dtype: torch.dtype
    encoding: str = "raw"


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    pieces: tuple[tuple[str, Piece], ...]


def _item_view(item: WriteItem, src: Source) -> memoryview:
    data = tensor_bytes(src.tensor)
    if item.whole or src.tensor.dim() == 0:
        return data
    # Items are row ranges of the source box (plan splits along dim 0 only).
    shape = tuple(src.tensor.shape)
    row = math.prod(shape[1:]) * src.tensor.element_size()
    r0 = item.offsets[0] - src.offsets[0]
    if tuple(item.shape[1:]) != shape[1:] or r0 < 0 or r0 + item.shape[0] > shape[0]:
        raise ValueError(f"write item {item.key!r} box does not lie in the rank's local tensor")
    return data[r0 * row : (r0 + item.shape[0]) * row]


def _header_name(item: WriteItem) -> str:
    return item.key if item.whole else f"{item.key}#{','.join(map(str, item.offsets))}"


def write_file(storage: Storage, prefix: str, fp: FilePlan, sources: dict[str, Source]) -> WrittenFile:
    views = []
    entries = []
    for it in fp.items:
        src = sources[it.key]
        v = _item_view(it, src)
        if v.nbytes != it.nbytes:
            raise ValueError(f"write item {it.key!r}: {v.nbytes} bytes, plan expected {it.nbytes}")
        st_dtype, st_shape = st_dtype_and_shape(
            src.dtype if src.encoding == "raw" else torch.uint8, it.shape, it.nbytes
        )
        entries.append(HeaderEntry(_header_name(it), st_dtype, tuple(st_shape), it.nbytes))
        views.append(v)
    head, pos = build_header(entries, {"format": "pt"})
    w = storage.open_write(f"{prefix}/{fp.name}")
    pieces: list[tuple[str, Piece]] = []
    try:
        batch: list[memoryview] = [memoryview(head)]
        batch_bytes = len(head)
        for it, v in zip(fp.items, views):
            c = crc32c(v)
            box_offs = None if it.whole else it.offsets
            box_shape = None if it.whole else it.shape
            pieces.append((it.key, Piece(fp.name, pos, pos + v.nbytes, c, box_offs, box_shape)))
            pos += v.nbytes
            batch.append(v)
            batch_bytes += v.nbytes
            if batch_bytes >= _BATCH_BYTES or len(batch) >= 1024:
                w.write(batch)
                batch, batch_bytes = [], 0
        if batch:
            w.write(batch)
        w.close()
    except BaseException:
        try:
            w.abort()
        except Exception as e:  # keep the original error; the abort failure only matters for cleanup
            log.debug("abort of %s failed: %s", fp.name, e)
        raise
    return WrittenFile(fp.name, pos, tuple(pieces))


def write_files(
    storage: Storage, prefix: str, files: Sequence[FilePlan], sources: dict[str, Source], options: IOOptions
) -> list[WrittenFile]:
    """Write every planned file, several in parallel; raises the first error after all workers stopped."""
    if not files:
        return []
    if len(files) == 1 or options.threads == 1:
        return [write_file(storage, prefix, fp, sources) for fp in files]
    with ThreadPoolExecutor(max_workers=min(options.threads, len(files)), thread_name_prefix="ckpt-write") as ex:
        futs = [ex.submit(write_file, storage, prefix, fp, sources) for fp in files]
        results, first_err = [], None
        for f in futs:
            try:
                results.append(f.result())
            except BaseException as e:
                first_err = first_err or e
        if first_err is not None:
            raise first_err
    return results


# -- reading ------------------------------------------------------------------------------------------------
@dataclass
class ReadTask:
    """Read one stored piece, entirely, into ``dest`` (a contiguous region exactly ``piece.nbytes`` long)."""

    key: str
    piece: Piece
    dest: memoryview
    after: Callable[[], None] | None = None
    """Runs once the piece is read and verified (e.g. copy a temporary buffer into the real destination)."""


def read_pieces(
    storage: Storage, prefix: str, tasks: Sequence[ReadTask], options: IOOptions, *, step: int | None = None
) -> None:
    """Read and (optionally) verify all ``tasks`` with up to ``options.threads`` parallel requests."""
    if not tasks:
        return
    chunk = max(1 << 20, options.read_chunk_bytes)
    # Build requests: split big pieces, coalesce small neighbours of the same file into one vectored read.
    reqs: list[tuple[str, int, list[memoryview], list[ReadTask]]] = []
    by_file: dict[str, list[ReadTask]] = {}
    for t in tasks:
        if t.dest.nbytes != t.piece.nbytes:
            raise ValueError(f"read of {t.key!r}: destination has {t.dest.nbytes} bytes, piece {t.piece.nbytes}")
        by_file.setdefault(t.piece.file, []).append(t)
    for fname, ts in by_file.items():
        ts.sort(key=lambda t: t.piece.start)
        cur: list[ReadTask] = []
        cur_start = cur_end = 0
        for t in ts:
            p = t.piece
            if p.nbytes > chunk:
                for a in range(0, p.nbytes, chunk):
                    b = min(p.nbytes, a + chunk)
                    reqs.append((fname, p.start + a, [t.dest[a:b]], [t] if b == p.nbytes else []))
                continue
            if cur and (p.start != cur_end or cur_end - cur_start + p.nbytes > chunk or len(cur) >= 1024):
                reqs.append((fname, cur_start, [c.dest for c in cur], cur))
                cur = []
            if not cur:
                cur_start = p.start
            cur.append(t)
            cur_end = p.end
        if cur:
            reqs.append((fname, cur_start, [c.dest for c in cur], cur))

    def run(req: tuple[str, int, list[memoryview], list[ReadTask]]) -> None:
        fname, off, bufs, _ = req
        try:
            storage.read_into(f"{prefix}/{fname}", off, bufs)
        except EOFError as e:
            key = req[3][0].key if req[3] else "?"
            raise IntegrityError(
                f"step {step}: file {fname} is shorter than the manifest says ({e}); key {key!r}",
                step=step,
                file=fname,
                key=key,
            ) from None
        except FileNotFoundError:
            raise IntegrityError(
                f"step {step}: data file {fname} is missing", step=step, file=fname, key=None
            ) from None

    _parallel(run, reqs, options.threads)

    def check(t: ReadTask) -> None:
        if options.verify:
            got = crc32c(t.dest)
            if got != t.piece.crc32c:
                raise IntegrityError(
                    f"checksum mismatch in step {step}, file {t.piece.file}, key {t.key!r} "
                    f"(bytes {t.piece.start}-{t.piece.end}: crc32c {got:08x}, manifest {t.piece.crc32c:08x})",
                    step=step,
                    file=t.piece.file,
                    key=t.key,
                )
        if t.after is not None:
            t.after()

    _parallel(check, list(tasks), options.threads)


def _parallel(fn: Callable, items: Sequence, threads: int) -> None:
    if len(items) <= 1 or threads <= 1:
        for it in items:
            fn(it)
        return
    # Split work into contiguous slices per thread: cheap for thousands of small items.
    n = min(threads, len(items))
    err: list[BaseException] = []
    lock = threading.Lock()

    def worker(part: Sequence) -> None:
        for it in part:
            if err:
                return
            try:
                fn(it)
            except BaseException as e:
                with lock:
                    err.append(e)
                return

    # Interleave so large items at the front spread across threads.
    parts = [items[i::n] for i in range(n)]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="ckpt-read") as ex:
        list(ex.map(worker, parts))
    if err:
        raise err[0]


# -- destinations -------------------------------------------------------------------------------------------
def _box_intersection(
    a_off: Sequence[int], a_shape: Sequence[int], b_off: Sequence[int], b_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def _slices(off: Sequence[int], shape: Sequence[int], base: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o - b, o - b + s) for o, s, b in zip(off, shape, base))


def plan_fill(
    key: str,
    entry: TensorEntry,
    dest: torch.Tensor,
    box_offsets: Sequence[int] | None = None,
) -> list[ReadTask]:
    """Read tasks that fill ``dest`` (contiguous CPU tensor of the stored dtype) with its box of ``key``.

    ``box_offsets`` is where ``dest`` sits in the global tensor (zeros for a whole tensor). Pieces that are a
    contiguous region of ``dest`` are read straight into it; others go through a temporary and a copy.
    """
    gshape = entry.shape
    d_off = tuple(box_offsets) if box_offsets is not None else (0,) * len(gshape)
    d_shape = tuple(dest.shape)
    dbytes = tensor_bytes(dest)
    item = dest.element_size()
    tasks: list[ReadTask] = []
    for p in entry.pieces:
        p_off = p.offsets if p.offsets is not None else (0,) * len(gshape)
        p_shape = p.shape if p.shape is not None else gshape
        if len(gshape) == 0:
            tasks.append(ReadTask(key, p, dbytes))
            continue
        inter = _box_intersection(p_off, p_shape, d_off, d_shape)
        if inter is None or math.prod(inter[1]) == 0:
            continue
        i_off, i_shape = inter
        # Contiguous case: the piece is inside dest and spans dest's trailing dims -> a row range of dest.
        if i_shape == tuple(p_shape) and tuple(p_shape[1:]) == d_shape[1:]:
            row = math.prod(d_shape[1:]) * item
            r0 = p_off[0] - d_off[0]
            tasks.append(ReadTask(key, p, dbytes[r0 * row : (r0 + p_shape[0]) * row]))
            continue
        tmp = torch.empty(p_shape, dtype=dest.dtype)
        src_sl = _slices(i_off, i_shape, p_off)
        dst_sl = _slices(i_off, i_shape, d_off)

        def copy(tmp: torch.Tensor = tmp, src_sl: tuple = src_sl, dst_sl: tuple = dst_sl) -> None:
            dest[dst_sl].copy_(tmp[src_sl])

        tasks.append(ReadTask(key, p, tensor_bytes(tmp), after=copy))
    return tasks
