"""I/O layer: executes write plans and read requests against a Storage, with checksums and threads.

Writes stream straight from tensor memory (``memoryview`` over the tensor's bytes, ``writev`` locally) — no
pickle and no in-memory copy of a shard. Reads land straight in the destination tensor's storage whenever
the stored piece is a contiguous region of it, which is the common case (same shapes, row-sharded tensors).

Checksums cost no extra pass over main memory: a big tensor is checksummed and written slice by slice (2 MiB),
and on local storage reads go slice by slice too, each slice checksummed right after it landed, while it is
still in the CPU cache. Pieces split into parallel ranges get their crc32c by combining the ranges' values.
A piece whose crc32c covers a group of neighbouring parts (``Piece.span``, format 2 layout lines with a group
size) is verified by reading its whole group, once for all the pieces of that group a call reads; a damaged byte
anywhere in the group fails every piece of it.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import IntegrityError, ManifestError, UnsupportedValueError
from .format.crc import crc32c, crc32c_combine
from .format.manifest import Piece, TensorEntry, pieces_in_box
from .format.safetensors import HeaderEntry, build_header, st_dtype_and_shape
from .options import IOOptions
from .plan import FilePlan, WriteItem
from .storage.base import Storage

log = logging.getLogger("ckptstore")

# Bytes are checksummed and written (or read and checksummed) in slices of this size, so the second pass over a
# slice finds it in the CPU cache instead of main memory (L2 is 0.5-2 MiB per core on current server CPUs).
_SLICE_BYTES = 2 << 20
# Small tensors are gathered into one writev of about this size.
_WRITE_BATCH_BYTES = 8 << 20


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy), exactly as long as the tensor's own bytes.

    The length is checked against the tensor's real storage: for sub-byte dtypes (``quint4x2``...) ``numel *
    element_size`` exceeds the allocation, and a view that long would let a read write past it.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if t.numel() == 0:
        return memoryview(b"")
    want = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if want > have:
        raise UnsupportedValueError(
            f"a {t.dtype} tensor of {t.numel()} elements claims {want} bytes but its storage holds {have}: "
            "sub-byte and quantized dtypes cannot be read or written as raw bytes"
        )
    if t.dim():
        # Fast path (~3x cheaper per tensor, which matters for 10k-tensor states): numpy view of the tensor.
        try:
            return memoryview(t.numpy()).cast("B")
        except (TypeError, RuntimeError, ValueError, NotImplementedError):
            pass  # dtypes numpy lacks (bfloat16, float8, ...) or formats memoryview cannot cast
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


_SAMPLE_BLOCK = 4096
_SAMPLE_BLOCKS = 8
_SAMPLE_WHOLE = 64 * 1024


Box = tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]
"""(local tensor, global shape, global offsets of the local box)."""


def _dtensor_type() -> type | None:
    """DTensor's class if ``torch.distributed.tensor`` was imported, else None (then no DTensor can exist).

    Importing it ourselves would cost ~0.6 s (it pulls in sympy) in every process that never uses DTensors.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def tensor_local_box(t: torch.Tensor) -> Box:
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


def sample_crc(view: memoryview, *, full: bool = False) -> int:
    """crc32c of ``view`` (``full``, or up to 64 KiB), else of 8 evenly spread 4 KiB blocks of it: a cheap
    fingerprint to compare replicas of one tensor across ranks (about 32 KiB read per tensor)."""
    n = view.nbytes
    if full or n <= _SAMPLE_WHOLE:
        return crc32c(view)
    value = 0
    last = n - _SAMPLE_BLOCK
    for i in range(_SAMPLE_BLOCKS):
        off = last * i // (_SAMPLE_BLOCKS - 1)
        value = crc32c(view[off : off + _SAMPLE_BLOCK], value)
    return value


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


def header_name(key: str, offsets: Sequence[int] | None = None) -> str:
    """The safetensors header name of a whole tensor (``offsets`` None) or of one piece of it: the key with every
    ``#`` doubled, then ``#<offsets>`` for a piece, so no user key can collide with another key's piece name
    (``"w#0"`` whole is ``w##0``, piece 0 of ``"w"`` is ``w#0``). Readers locate bytes by the manifest's ranges;
    the names are for people and for ``safetensors.safe_open``."""
    name = key.replace("#", "##")
    return name if offsets is None else f"{name}#{','.join(map(str, offsets))}"


def _header_name(item: WriteItem) -> str:
    return header_name(item.key, None if item.whole else item.offsets)


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
    # The views and the header stay alive and unchanged until write_files returns, so the storage may hold on
    # to them instead of copying (S3 sends parts straight from tensor memory).
    w = storage.open_write(f"{prefix}/{fp.name}", borrow=True)
    pieces: list[tuple[str, Piece]] = []
    try:
        # Checksum each slice right before it is written, so writev copies it out of the CPU cache; small
        # tensors are gathered into batches of about _WRITE_BATCH_BYTES per writev.
        batch: list[memoryview] = [memoryview(head)]
        batch_bytes = len(head)
        for it, v in zip(fp.items, views):
            n = v.nbytes
            if n <= _SLICE_BYTES:
                c = crc32c(v)
                batch.append(v)
                batch_bytes += n
            else:
                if batch_bytes:
                    w.write(batch)
                    batch, batch_bytes = [], 0
                c = 0
                for a in range(0, n, _SLICE_BYTES):
                    part = v[a : a + _SLICE_BYTES]
                    c = crc32c(part, c)
                    w.write([part])
            if batch_bytes >= _WRITE_BATCH_BYTES or len(batch) >= 1024:
                w.write(batch)
                batch, batch_bytes = [], 0
            box_offs = None if it.whole else it.offsets
            box_shape = None if it.whole else it.shape
            pieces.append((it.key, Piece(fp.name, pos, pos + n, c, box_offs, box_shape)))
            pos += n
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
    results: list[WrittenFile | None] = [None] * len(files)

    def one(i: int) -> None:
        results[i] = write_file(storage, prefix, files[i], sources)

    # Biggest files first, each worker taking the next one when it is free.
    order = sorted(range(len(files)), key=lambda i: -files[i].nbytes)
    _parallel(one, order, options.threads, name="ckpt-write")
    return [r for r in results if r is not None]


# -- reading ------------------------------------------------------------------------------------------------
@dataclass
class ReadTask:
    """Read one stored piece, entirely, into ``dest`` (a contiguous region exactly ``piece.nbytes`` long)."""

    key: str
    piece: Piece
    dest: memoryview
    after: Callable[[], None] | None = None
    """Runs once the piece is read and verified (e.g. copy a temporary buffer into the real destination)."""


@dataclass
class _ReadReq:
    """One read request: ``parts`` are (task, byte offset inside the task's piece, destination) back to back."""

    file: str
    offset: int
    parts: list[tuple[ReadTask, int, memoryview]]


@dataclass
class _Group:
    """The bytes ``[start, end)`` of ``file`` that one checksum covers (a group of parts, ``Piece.span``), read
    once for all the tasks that need a part of it: ``segs`` are the destinations back to back (None: bytes no
    task needs, read into scratch memory only to be checked)."""

    file: str
    start: int
    end: int
    tasks: list[ReadTask]  # read straight into their destination, in file order
    dups: list[tuple[ReadTask, ReadTask]]  # (task, the task reading the same piece): copied once verified
    segs: list[tuple[memoryview | None, int]]


@dataclass
class _GroupReq:
    """Neighbouring groups of one file read by one request (``nbytes`` at most ``read_chunk_bytes``, or one
    group larger than that, then read range by range)."""

    file: str
    offset: int
    groups: list[_Group]
    nbytes: int


def _groups(tasks: Sequence[ReadTask], chunk: int) -> list[_GroupReq]:
    """Read requests for ``tasks`` whose pieces are checked by a group checksum: each group read and checked once,
    whatever number of its parts the tasks need; neighbouring groups coalesced up to ``chunk`` bytes."""
    by_span: dict[tuple[str, int, int], list[ReadTask]] = {}
    for t in tasks:
        p = t.piece
        s0, s1 = p.span  # type: ignore[misc]
        if not s0 <= p.start <= p.end <= s1:
            raise ManifestError(
                f"piece [{p.start}, {p.end}] of {p.file!r} ({t.key!r}) lies outside the bytes {s0}-{s1} its "
                "checksum covers; the manifest is damaged"
            )
        by_span.setdefault((p.file, s0, s1), []).append(t)
    reqs: list[_GroupReq] = []
    cur: _GroupReq | None = None
    for (f, s0, s1), ts in sorted(by_span.items()):
        ts.sort(key=lambda t: (t.piece.start, t.piece.end))
        g = _Group(f, s0, s1, [], [], [])
        pos, prev = s0, None
        for t in ts:
            p = t.piece
            if prev is not None and p.start == prev.piece.start and p.end == prev.piece.end:
                g.dups.append((t, prev))
                continue
            if p.start < pos:
                raise ManifestError(f"pieces of {f!r} overlap at byte {p.start} ({t.key!r}); the manifest is damaged")
            if p.start > pos:
                g.segs.append((None, p.start - pos))
            g.segs.append((t.dest, p.nbytes))
            g.tasks.append(t)
            prev, pos = t, p.end
        if pos < s1:
            g.segs.append((None, s1 - pos))
        n = s1 - s0
        if (
            cur is None
            or cur.file != f
            or cur.offset + cur.nbytes != s0
            or cur.nbytes + n > chunk
            or len(cur.groups) >= 256
        ):
            cur = _GroupReq(f, s0, [], 0)
            reqs.append(cur)
        cur.groups.append(g)
        cur.nbytes += n
    return reqs


def read_pieces(
    storage: Storage, prefix: str, tasks: Sequence[ReadTask], options: IOOptions, *, step: int | None = None
) -> None:
    """Read and (optionally) verify all ``tasks`` with up to ``options.threads`` parallel requests.

    Each worker checksums what it just read (slice by slice on local storage, while the bytes are still in the
    CPU cache) and runs a task's ``after`` as soon as its piece is complete and verified. A piece larger than
    ``read_chunk_bytes`` is read as several parallel ranges whose checksums are combined.
    """
    if not tasks:
        return
    chunk = max(1 << 20, options.read_chunk_bytes)
    verify = options.verify
    # Slice-wise reads only where a request costs nothing extra (local files); elsewhere one request, then crc.
    slice_bytes = _SLICE_BYTES if storage.small_reads_cheap else 0
    # Build requests: split big pieces, coalesce small neighbours of the same file into one vectored read.
    reqs: list[_ReadReq | _GroupReq] = []
    by_file: dict[str, list[ReadTask]] = {}
    grouped: list[ReadTask] = []  # pieces whose checksum covers a group of parts (format 2 layout with k)
    for t in tasks:
        if t.dest.nbytes != t.piece.nbytes:
            raise ValueError(f"read of {t.key!r}: destination has {t.dest.nbytes} bytes, piece {t.piece.nbytes}")
        if verify and t.piece.span is not None:
            grouped.append(t)
            continue
        by_file.setdefault(t.piece.file, []).append(t)
    split: dict[int, ReadTask] = {}  # id(task) -> task, for pieces read as several ranges
    for fname, ts in by_file.items():
        ts.sort(key=lambda t: t.piece.start)
        cur: list[tuple[ReadTask, int, memoryview]] = []
        cur_start = cur_end = 0
        for t in ts:
            p = t.piece
            if p.nbytes > chunk:
                split[id(t)] = t
                for a in range(0, p.nbytes, chunk):
                    b = min(p.nbytes, a + chunk)
                    reqs.append(_ReadReq(fname, p.start + a, [(t, a, t.dest[a:b])]))
                continue
            if cur and (p.start != cur_end or cur_end - cur_start + p.nbytes > chunk or len(cur) >= 1024):
                reqs.append(_ReadReq(fname, cur_start, cur))
                cur = []
            if not cur:
                cur_start = p.start
            cur.append((t, 0, t.dest))
            cur_end = p.end
        if cur:
            reqs.append(_ReadReq(fname, cur_start, cur))
    if grouped:
        reqs.extend(_groups(grouped, chunk))
    # Largest first, so the tail of the run is small requests spread over all threads.
    reqs.sort(key=lambda r: -(r.nbytes if isinstance(r, _GroupReq) else sum(v.nbytes for _, _, v in r.parts)))

    lock = threading.Lock()
    local = threading.local()  # per thread: scratch memory for the bytes of groups no task needs
    ranges: dict[int, list[tuple[int, int, int]]] = {}  # id(task) -> [(offset in piece, nbytes, crc)]

    def fail_read(req: _ReadReq | _GroupReq, e: BaseException) -> IntegrityError:
        if isinstance(req, _GroupReq):
            key = req.groups[0].tasks[0].key
        else:
            key = req.parts[0][0].key if req.parts else "?"
        if isinstance(e, EOFError):
            return IntegrityError(
                f"step {step}: file {req.file} is shorter than the manifest says ({e}); key {key!r}",
                step=step,
                file=req.file,
                key=key,
            )
        return IntegrityError(f"step {step}: data file {req.file} is missing", step=step, file=req.file, key=None)

    def read(req: _ReadReq | _GroupReq, bufs: list[memoryview], offset: int) -> None:
        try:
            storage.read_into(f"{prefix}/{req.file}", offset, bufs)
        except (EOFError, FileNotFoundError) as e:
            raise fail_read(req, e) from None

    def scratch(n: int) -> memoryview:
        buf = getattr(local, "buf", None)
        if buf is None or buf.nbytes < n:
            buf = local.buf = memoryview(bytearray(max(n, 1 << 16)))
        return buf

    def run_groups(req: _GroupReq) -> None:
        got: list[int] = []
        if req.nbytes > chunk:  # one group larger than a request (not what ckptstore writes): range by range
            g = req.groups[0]
            crc, pos = 0, g.start
            for view, n in g.segs:
                for a in range(0, n, chunk):
                    b = min(n, a + chunk)
                    buf = view[a:b] if view is not None else scratch(chunk)[: b - a]
                    read(req, [buf], pos)
                    crc = crc32c(buf, crc)
                    pos += b - a
            got.append(crc)
        else:
            sp, mem = 0, scratch(sum(n for g in req.groups for v, n in g.segs if v is None))
            per_group: list[list[memoryview]] = []
            for g in req.groups:
                bufs = []
                for view, n in g.segs:
                    if view is None:
                        view, sp = mem[sp : sp + n], sp + n
                    bufs.append(view)
                per_group.append(bufs)
            if slice_bytes:  # local: group by group, each checksummed while it is in the CPU cache
                for g, bufs in zip(req.groups, per_group):
                    read(req, bufs, g.start)
                    crc = 0
                    for b in bufs:
                        crc = crc32c(b, crc)
                    got.append(crc)
            else:
                read(req, [b for bufs in per_group for b in bufs], req.offset)
                for bufs in per_group:
                    crc = 0
                    for b in bufs:
                        crc = crc32c(b, crc)
                    got.append(crc)
        for g, crc in zip(req.groups, got):
            for t in g.tasks:
                if crc != t.piece.crc32c:
                    raise _mismatch(step, t.key, t.piece, crc)
            for t in g.tasks:
                if t.after is not None:
                    t.after()
            for t, src in g.dups:
                if crc != t.piece.crc32c:
                    raise _mismatch(step, t.key, t.piece, crc)
                t.dest[:] = src.dest
                if t.after is not None:
                    t.after()

    def run(req: _ReadReq | _GroupReq) -> None:
        if isinstance(req, _GroupReq):
            run_groups(req)
            return
        crcs = [0] * len(req.parts)
        if not verify:
            read(req, [v for _, _, v in req.parts], req.offset)
        elif not slice_bytes:
            read(req, [v for _, _, v in req.parts], req.offset)
            crcs = [crc32c(v) for _, _, v in req.parts]
        else:
            # Read about slice_bytes at a time and checksum it at once, while it is in the CPU cache.
            pos = req.offset
            batch: list[tuple[int, memoryview]] = []
            nb = 0
            for i, (_, _, v) in enumerate(req.parts):
                off = 0
                while off < v.nbytes:
                    take = min(v.nbytes - off, slice_bytes - nb)
                    batch.append((i, v[off : off + take]))
                    nb += take
                    off += take
                    if nb >= slice_bytes:
                        read(req, [b for _, b in batch], pos)
                        for j, b in batch:
                            crcs[j] = crc32c(b, crcs[j])
                        pos += nb
                        batch, nb = [], 0
            if batch:
                read(req, [b for _, b in batch], pos)
                for j, b in batch:
                    crcs[j] = crc32c(b, crcs[j])
        for (t, off, v), c in zip(req.parts, crcs):
            if id(t) in split:
                with lock:
                    ranges.setdefault(id(t), []).append((off, v.nbytes, c))
            else:
                finish(t, c)

    def finish(t: ReadTask, got: int) -> None:
        if verify and got != t.piece.crc32c:
            raise _mismatch(step, t.key, t.piece, got)
        if t.after is not None:
            t.after()

    _parallel(run, reqs, options.threads)
    for tid, t in split.items():
        got = 0
        if verify:
            for _, n, c in sorted(ranges[tid]):
                got = crc32c_combine(got, c, n)
        finish(t, got)


def _mismatch(step: int | None, key: str, piece: Piece, got: int) -> IntegrityError:
    if piece.span is not None:
        s0, s1 = piece.span
        what = (
            f"bytes {piece.start}-{piece.end}, checked with the group of parts at bytes {s0}-{s1}: crc32c {got:08x}, "
            f"manifest {piece.crc32c:08x}; a damaged byte anywhere in the group fails every part of it"
        )
    else:
        what = f"bytes {piece.start}-{piece.end}: crc32c {got:08x}, manifest {piece.crc32c:08x}"
    return IntegrityError(
        f"checksum mismatch in step {step}, file {piece.file}, key {key!r} ({what})",
        step=step,
        file=piece.file,
        key=key,
    )


def verify_views(
    items: Sequence[tuple[str, Piece, memoryview]], options: IOOptions, *, step: int | None = None
) -> None:
    """Check the crc32c of pieces that are already in memory (``(key, piece, bytes)``), several in parallel.

    Used for memory-mapped shard files: the check is also what faults their pages in, in parallel.
    """
    if not options.verify or not items:
        return
    for key, piece, _ in items:
        if piece.span is not None:  # the caller maps only pieces checked by their own bytes (walk._map_piece)
            raise ValueError(f"{key!r}: a piece checked by a group of parts cannot be verified from its own bytes")
    # Big pieces are checked in ranges whose checksums are combined, so one large tensor still uses every thread.
    chunk = max(1 << 20, options.read_chunk_bytes)
    work: list[tuple[int, int, int]] = []  # (item index, start, end)
    for i, (_, _, v) in enumerate(items):
        work.extend((i, a, min(v.nbytes, a + chunk)) for a in range(0, max(v.nbytes, 1), chunk))
    crcs: dict[tuple[int, int], int] = {}

    def run(w: tuple[int, int, int]) -> None:
        i, a, b = w
        crcs[(i, a)] = crc32c(items[i][2][a:b])  # distinct keys: no lock needed

    _parallel(run, work, options.threads, name="ckpt-verify")
    got = [0] * len(items)
    for i, a, b in work:  # in order: ranges of one item are ascending
        got[i] = crc32c_combine(got[i], crcs[(i, a)], b - a)
    for (key, piece, _), g in zip(items, got):
        if g != piece.crc32c:
            raise _mismatch(step, key, piece, g)


def _parallel(fn: Callable, items: Sequence, threads: int, *, name: str = "ckpt-read") -> None:
    """Run ``fn`` over ``items`` on up to ``threads`` threads, each taking the next item when it is free.

    The calling thread is one of the workers. The others are all started before any of them works: a thread
    started while another one runs Python code waits for the GIL (~5-20 ms each). Stops handing out items after
    the first error, which is raised once every worker stopped.
    """
    if len(items) <= 1 or threads <= 1:
        for it in items:
            fn(it)
        return
    n = min(threads, len(items))
    err: list[BaseException] = []
    lock = threading.Lock()
    nxt = iter(items)
    go = threading.Event()

    def worker() -> None:
        while not err:
            with lock:
                it = next(nxt, _DONE)
            if it is _DONE:
                return
            try:
                fn(it)
            except BaseException as e:
                with lock:
                    err.append(e)
                return

    def helper() -> None:
        go.wait()
        worker()

    pool = [threading.Thread(target=helper, name=f"{name}-{i}", daemon=True) for i in range(1, n)]
    try:
        for t in pool:
            t.start()
    finally:
        go.set()
        try:
            worker()
        finally:
            for t in pool:
                if t.is_alive() or t.ident is not None:
                    t.join()
    if err:
        raise err[0]


_DONE = object()


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
    dbytes = tensor_bytes(dest)
    pieces = entry.pieces
    # Fast path, by far the most common: one piece holding the whole tensor, read into a whole-tensor dest.
    if (
        len(pieces) == 1
        and pieces[0].offsets is None
        and (box_offsets is None or not any(box_offsets))
        and tuple(dest.shape) == tuple(gshape)
        and dbytes.nbytes == pieces[0].nbytes
        and dbytes.nbytes
    ):
        return [ReadTask(key, pieces[0], dbytes)]
    d_off = tuple(box_offsets) if box_offsets is not None else (0,) * len(gshape)
    d_shape = tuple(dest.shape)
    item = dest.element_size()
    tasks: list[ReadTask] = []
    for p in pieces_in_box(entry, d_off, d_shape):  # compact (format 2) rows: only the parts the box needs
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
