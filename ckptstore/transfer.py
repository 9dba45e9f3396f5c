"""Copy, mirror and verify committed steps between storages, byte for byte, checksums checked on the way.

The unit of transfer is a committed step: its data files are copied first (streamed in chunks, several files in
parallel, every piece's crc32c recomputed while the bytes pass), then the source's ``manifest.json`` is written
*last* with ``create_exclusive`` — so the destination commits the step atomically or not at all, exactly like a
save. A step the destination already has is never overwritten (steps are immutable). Inference artifacts of a
step (``artifact-<name>.*``, see :mod:`ckptstore.artifacts`) are copied after the manifest, each sidecar last.

The same streaming checker backs :func:`verify_step`, which re-reads every byte of a step without loading it and
reports every problem (step, file, key) instead of stopping at the first.

Example::

    from ckptstore.storage import open_storage
    from ckptstore.transfer import copy_steps, verify_step

    src = open_storage("/scratch/run-7")
    dst = open_storage("s3://bucket/run-7", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}})
    for res in copy_steps(src, dst):            # every committed step dst lacks
        print(res.step, res.nbytes)
    assert verify_step(dst, 1200).ok
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    ManifestError,
    UnsafeCheckpointError,
)
from .format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, Piece, parse_step_dir, step_dir
from .format.safetensors import parse_header
from .io import crc32c
from .layout import StepFiles, manifest_name
from .storage.base import NotRegularFileError, Storage

log = logging.getLogger("ckptstore")

#: Bytes moved per read request while copying or verifying.
DEFAULT_CHUNK_BYTES = 16 << 20
#: Files copied / verified in parallel.
DEFAULT_THREADS = 4

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just processed (from worker threads; must be thread-safe)."""
StopFn = Callable[[], bool]
"""Polled between chunks; returning True cancels the transfer (:class:`TransferCancelled`)."""


class TransferCancelled(CheckpointError):
    """A copy was stopped on request (``should_stop`` returned True); nothing was committed at the destination."""


@dataclass(frozen=True)
class CopyResult:
    """Outcome of copying one step.

    Example::

        res = copy_step(src, dst, 1200)
        print(f"step {res.step}: {res.nbytes / 2**20:.1f} MiB in {res.files} files, {res.seconds:.2f}s")
    """

    step: int
    copied: bool
    """True when the step itself was copied; False when the destination already had it (then ``artifacts``
    lists the artifacts added to the existing step, if any)."""
    nbytes: int = 0
    """Bytes written (data files, manifest and artifacts)."""
    files: int = 0
    seconds: float = 0.0
    artifacts: tuple[str, ...] = ()
    """Names of the artifacts copied along."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "copied": self.copied,
            "nbytes": self.nbytes,
            "files": self.files,
            "seconds": round(self.seconds, 6),
            "artifacts": list(self.artifacts),
        }


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stored step; ``file`` and ``key`` are None when they do not apply."""

    step: int
    file: str | None
    key: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "file": self.file, "key": self.key, "message": self.message}

    def __str__(self) -> str:
        where = [f"step {self.step}"]
        if self.file:
            where.append(f"file {self.file}")
        if self.key:
            where.append(f"key {self.key!r}")
        return f"{', '.join(where)}: {self.message}"


@dataclass
class VerifyResult:
    """What :func:`verify_step` found. ``ok`` when ``problems`` is empty.

    Example::

        res = verify_step(storage, 1200)
        for p in res.problems:
            print(p)          # step 1200, file shard-…-r0-0.safetensors, key 'model/fc1.weight': checksum mismatch …
    """

    step: int
    nbytes: int = 0
    """Bytes re-read."""
    files: int = 0
    tensors: int = 0
    artifacts: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ok": self.ok,
            "nbytes": self.nbytes,
            "files": self.files,
            "tensors": self.tensors,
            "artifacts": self.artifacts,
            "seconds": round(self.seconds, 6),
            "problems": [p.to_dict() for p in self.problems],
        }


# -- helpers ------------------------------------------------------------------------------------------------
def as_storage(x: Any) -> Storage:
    """Accept a :class:`Storage` or anything with a ``.storage`` (a ``CheckpointManager``)."""
    st = getattr(x, "storage", x)
    if not isinstance(st, Storage):
        raise TypeError(f"expected a Storage or a CheckpointManager, got {type(x).__name__}")
    return st


def committed_steps(storage: Storage, known: Container[int] = ()) -> list[int]:
    """Steps with a visible generation (a manifest that is not quarantined) under ``storage``, ascending.

    Only real step directories count: a symbolic link, FIFO or file named like a step is skipped with a warning
    (never followed). Steps in ``known`` (e.g. manifests already read) are not checked again.

    Example::

        committed_steps(open_storage("/ckpt"))   # [100, 200, 1000]
    """
    out = []
    for entry in storage.list_entries(""):
        s = parse_step_dir(entry.name)
        if s is None:
            continue
        if entry.kind != "dir":
            log.warning("ignoring %s under %s: not a real step directory (%s)", entry.name, storage.url, entry.kind)
            continue
        if s in known or step_files(storage, s).visible is not None:
            out.append(s)
    return sorted(out)


def _generations(storage: Storage) -> dict[int, StepFiles]:
    """Every real step directory's generations (one listing each), for steps with a visible generation."""
    out = {}
    for step in committed_steps(storage):
        files = step_files(storage, step)
        if files.visible is not None:
            out[step] = files
    return out


def _dst_has(dst_files: StepFiles | None, src_files: StepFiles) -> bool:
    """``dst`` holds the generation ``src`` shows (same step, same immutable generation): nothing to copy. A
    destination with only an older generation of the step (the timeline ``src`` abandoned) still gets it."""
    return dst_files is not None and src_files.visible in dst_files.committed


def step_files(storage: Storage, step: int) -> StepFiles:
    """The generations of ``step`` (committed, quarantined) from one listing of its directory."""
    return StepFiles.from_entries((e.name, e.kind) for e in storage.list_entries(step_dir(step)))


def read_manifest(storage: Storage, step: int, generation: int | None = None) -> tuple[Manifest, bytes]:
    """The parsed manifest of a committed step (its visible generation, or ``generation``) and its exact bytes.

    Raises ``CheckpointNotFoundError`` when the step is not committed (or every generation is quarantined) and
    ``ManifestError`` when the manifest is oversized, malformed, not a regular file or claims another step.
    """
    if generation is None:
        files = step_files(storage, step)
        generation = files.visible
        if generation is None:
            why = " (every generation of it is quarantined)" if files.committed else ""
            raise CheckpointNotFoundError(f"step {step} is not committed under {storage.url}{why}", step=step)
    rel = f"{step_dir(step)}/{manifest_name(generation)}"
    where = storage.url_of(rel)
    try:
        size = storage.size(rel)
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where}: {size} bytes is larger than allowed; refusing to read it")
        data = storage.read_bytes(rel)
    except (FileNotFoundError, EOFError):
        raise CheckpointNotFoundError(f"step {step} is not committed under {storage.url}", step=step) from None
    except NotRegularFileError as e:
        # A FIFO would block, /dev/zero never end, a directory cannot be read: damage (or an attack), never read.
        raise ManifestError(f"{where} is a {e.kind or 'special file'}, not a manifest file: {e}") from None
    if len(data) > MAX_MANIFEST_BYTES:  # replaced by a bigger file between the two calls
        raise ManifestError(f"{where}: {len(data)} bytes is larger than allowed; refusing to parse it")
    m = Manifest.from_bytes(data, where=where)
    if m.step != step:
        raise ManifestError(f"{where} says step {m.step}, but it lives under step {step}")
    if generation_of(m) != generation:
        raise ManifestError(f"{where} says generation {generation_of(m)}, but its name says {generation}")
    return m, data


def generation_of(m: Manifest) -> int:
    """The generation a manifest records (``extras.lineage.generation``; 1 when absent, as before lineage)."""
    lineage = m.extras.get("lineage") if isinstance(m.extras, dict) else None
    g = lineage.get("generation", 1) if isinstance(lineage, dict) else 1
    return g if isinstance(g, int) and not isinstance(g, bool) and g >= 1 else 0


def parent_of(m: Manifest) -> tuple[int, int] | None:
    """(step, generation) this step was trained on from, as recorded at save time; None if unknown."""
    lineage = m.extras.get("lineage") if isinstance(m.extras, dict) else None
    p = lineage.get("parent") if isinstance(lineage, dict) else None
    ok = isinstance(p, dict) and all(type(p.get(k)) is int for k in ("step", "generation"))
    return (p["step"], p["generation"]) if ok else None


def _pieces_by_file(m: Manifest) -> dict[str, list[tuple[str, Piece]]]:
    by_file: dict[str, list[tuple[str, Piece]]] = {name: [] for name in m.files}
    for key, entry in m.tensors.items():
        for p in entry.pieces:
            by_file.setdefault(p.file, []).append((key, p))
    for ps in by_file.values():
        ps.sort(key=lambda kp: (kp[1].start, kp[1].end))
    return by_file


class _PieceChecker:
    """Incremental crc32c of every piece of one file while its bytes stream past, in order. Parts checked by the
    checksum of their group (format 2 layout lines with a group size) are checked once per group, as one piece
    covering the group's bytes (``Piece.span``) and named by its first key."""

    def __init__(self, pieces: Sequence[tuple[str, Piece]]) -> None:
        units: list[tuple[str, Piece]] = []
        groups: dict[tuple[int, int], int] = {}  # span -> how many parts
        for key, p in pieces:
            if p.span is None:
                units.append((key, p))
            elif p.span not in groups:
                groups[p.span] = 1
                units.append((key, Piece(p.file, p.span[0], p.span[1], p.crc32c)))
            else:
                groups[p.span] += 1
        if groups:
            units.sort(key=lambda kp: (kp[1].start, kp[1].end))
        self.groups = groups
        self.pieces = units
        self.crcs = [0] * len(self.pieces)
        self.seen = [0] * len(self.pieces)
        self._first = 0

    def feed(self, offset: int, data: memoryview | bytes) -> None:
        end = offset + len(data)
        mv = memoryview(data)
        ps = self.pieces
        j = self._first
        while j < len(ps) and ps[j][1].start < end:
            p = ps[j][1]
            lo, hi = max(p.start, offset), min(p.end, end)
            if hi > lo:
                self.crcs[j] = crc32c(mv[lo - offset : hi - offset], self.crcs[j])
                self.seen[j] += hi - lo
            j += 1
        while self._first < len(ps) and ps[self._first][1].end <= end:
            self._first += 1

    def problems(self, step: int, fname: str) -> list[Problem]:
        out = []
        for (key, p), got, seen in zip(self.pieces, self.crcs, self.seen):
            n = self.groups.get((p.start, p.end), 0) if self.groups else 0
            what = f" (a checksum group of {n} parts, from {key!r} on)" if n else ""
            if seen < p.nbytes:
                out.append(
                    Problem(step, fname, key, f"bytes {p.start}-{p.end}{what} are missing (the file is truncated)")
                )
            elif got != p.crc32c:
                out.append(
                    Problem(
                        step,
                        fname,
                        key,
                        f"checksum mismatch in bytes {p.start}-{p.end}{what}: crc32c {got:08x}, "
                        f"manifest {p.crc32c:08x}",
                    )
                )
        return out


def _header_problems(
    step: int, fname: str, head: bytes, size: int, pieces: Sequence[tuple[str, Piece]]
) -> list[Problem]:
    """The shard must be a valid safetensors file whose tensors sit exactly at the manifest's byte ranges."""
    try:
        _, _, data_start = parse_header(head, size)
        hlen = data_start - 8
        raw = json.loads(head[8 : 8 + hlen].decode("utf-8"))
    except ManifestError as e:
        return [Problem(step, fname, None, f"invalid safetensors header: {e}")]
    spans = {
        (data_start + v["data_offsets"][0], data_start + v["data_offsets"][1])
        for k, v in raw.items()
        if k != "__metadata__"
    }
    out = []
    for key, p in pieces:
        if (p.start, p.end) not in spans:
            out.append(Problem(step, fname, key, f"bytes {p.start}-{p.end} are not a tensor of the safetensors header"))
    return out


def _read_head(storage: Storage, rel: str, first: bytes, size: int) -> bytes:
    """Enough leading bytes of a shard to hold its header (reads more only for headers larger than a chunk)."""
    if len(first) < 8:
        return first
    hlen = int.from_bytes(first[:8], "little")
    need = 8 + hlen
    if need <= len(first) or need > size:
        return first
    return storage.read_bytes(rel, 0, need)


def _check_stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise TransferCancelled("transfer cancelled on request")


def _stream(
    storage: Storage,
    rel: str,
    length: int,
    chunk_bytes: int,
    sink: Callable[[int, bytes], None],
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> None:
    pos = 0
    while pos < length:
        _check_stop(should_stop)
        n = min(chunk_bytes, length - pos)
        data = storage.read_bytes(rel, pos, pos + n)
        sink(pos, data)
        pos += n
        if progress is not None:
            progress(n)


def _run_parallel(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """Run ``fn`` over ``items`` in a pool; raise the first error once every worker stopped."""
    if len(items) <= 1 or threads <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="ckpt-xfer") as ex:
        futs = [ex.submit(fn, it) for it in items]
        results, first = [], None
        for f in futs:
            try:
                results.append(f.result())
            except BaseException as e:
                first = first or e
    if first is not None:
        raise first
    return results


# -- verify ---------------------------------------------------------------------------------------------------
def verify_step(
    storage: Storage | Any,
    step: int,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    artifacts: bool = True,
) -> VerifyResult:
    """Re-read every byte of a committed step and check it against the manifest; never unpickles anything.

    Checks: the manifest parses and is safe; every data file exists with the size the manifest records; its
    safetensors header is valid and places each tensor at the manifest's byte range; the crc32c of every piece
    of every tensor; and each inference artifact's size and crc32c. All problems are collected (each names the
    step, file and key) — the step verifies when ``result.ok``. ``CheckpointNotFoundError`` if not committed.

    Example::

        res = verify_step(mgr, 1200)
        if not res.ok:
            raise SystemExit("\\n".join(map(str, res.problems)))
    """
    st = as_storage(storage)
    t0 = time.perf_counter()
    res = VerifyResult(step=step)
    prefix = step_dir(step)
    files = step_files(st, step)
    # The visible generation, or for a quarantined step its newest one (verify is how it gets inspected).
    generation = files.visible or (files.committed[-1] if files.committed else None)
    try:
        m, _ = read_manifest(st, step, generation)
    except CheckpointNotFoundError:
        raise
    except (ManifestError, UnsafeCheckpointError) as e:
        res.problems.append(Problem(step, MANIFEST_NAME, None, str(e)))
        res.seconds = time.perf_counter() - t0
        return res
    res.tensors = len(m.tensors)
    res.files = len(m.files)
    by_file = _pieces_by_file(m)
    lock = threading.Lock()

    def check_file(fname: str) -> tuple[int, list[Problem]]:
        rel = f"{prefix}/{fname}"
        expected = m.files[fname]
        pieces = by_file.get(fname, [])
        try:
            actual = st.size(rel)
        except FileNotFoundError:
            keys = _keys(pieces)
            what = f" ({len(keys)} tensors)" if len(keys) > 1 else ""
            return 0, [Problem(step, fname, keys[0] if keys else None, f"the data file is missing{what}")]
        probs: list[Problem] = []
        if actual != expected:
            probs.append(Problem(step, fname, None, f"file is {actual} bytes, the manifest says {expected}"))
        checker = _PieceChecker(pieces)
        first: list[bytes] = []

        def sink(off: int, data: bytes) -> None:
            if off == 0:
                first.append(data)
            checker.feed(off, data)

        length = min(actual, expected)
        try:
            _stream(st, rel, length, chunk_bytes, sink, progress, should_stop)
        except (FileNotFoundError, EOFError) as e:
            probs.append(Problem(step, fname, None, f"file changed while being read: {e}"))
        if first:
            try:
                head = _read_head(st, rel, first[0], actual)
            except (OSError, EOFError) as e:
                head = b""
                probs.append(Problem(step, fname, None, f"cannot read the header: {e}"))
            if head:
                probs.extend(_header_problems(step, fname, head, actual, pieces))
        elif expected > 0:
            probs.append(Problem(step, fname, None, "the data file is empty"))
        probs.extend(checker.problems(step, fname))
        return length, probs

    for nbytes, probs in _run_parallel(check_file, sorted(m.files), threads):
        with lock:
            res.nbytes += nbytes
            res.problems.extend(probs)
    if artifacts:
        from .artifacts import list_artifacts, verify_artifact

        try:
            infos = list_artifacts(st, step)
        except (ManifestError, UnsafeCheckpointError) as e:
            infos = []
            res.problems.append(Problem(step, None, None, f"artifact sidecar: {e}"))
        for info in infos:
            _check_stop(should_stop)
            res.artifacts += 1
            try:
                verify_artifact(st, info, progress=progress, chunk_bytes=chunk_bytes)
                res.nbytes += info.size
            except IntegrityError as e:
                res.problems.append(Problem(step, e.file, f"artifact:{info.name}", str(e)))
    res.problems.sort(key=lambda p: (p.file or "", p.key or "", p.message))
    res.seconds = time.perf_counter() - t0
    return res


def _keys(pieces: Iterable[tuple[str, Piece]]) -> list[str]:
    return list(dict.fromkeys(k for k, _ in pieces))


def step_bytes(storage: Storage | Any, step: int, *, artifacts: bool = True) -> int:
    """Bytes a copy or verify of ``step`` will move (data files, plus artifacts); for progress totals."""
    st = as_storage(storage)
    m, _ = read_manifest(st, step)
    total = sum(m.files.values())
    if artifacts:
        from .artifacts import list_artifacts

        try:
            total += sum(a.size for a in list_artifacts(st, step))
        except CheckpointError:
            pass
    return total


# -- copy -------------------------------------------------------------------------------------------------------
def copy_step(
    src: Storage | Any,
    dst: Storage | Any,
    step: int,
    *,
    verify: bool = True,
    artifacts: bool = True,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CopyResult:
    """Copy one committed step from ``src`` to ``dst``: data files first, the manifest last (``create_exclusive``).

    With ``verify`` (default) every piece's crc32c is checked as the bytes pass; a mismatch raises
    ``IntegrityError`` (naming step, file and key), removes what was written and commits nothing. Raises
    ``CheckpointExistsError`` when ``dst`` already has the step (or another writer commits it meanwhile),
    ``CheckpointNotFoundError`` when ``src`` does not, ``TransferCancelled`` when ``should_stop()`` turns True.

    Example::

        copy_step(open_storage("/fast/run"), open_storage("s3://bucket/run"), 1200)
    """
    s, d = as_storage(src), as_storage(dst)
    t0 = time.perf_counter()
    prefix = step_dir(step)
    m, manifest_bytes = read_manifest(s, step)
    d.check_commit_support()  # before the first upload, not at the commit
    # The same generation under the same name: a mirror holding an older generation of this step number (from
    # an abandoned branch) still gets the current one beside it.
    manifest_rel = f"{prefix}/{manifest_name(generation_of(m))}"
    if d.exists(manifest_rel):
        raise CheckpointExistsError(f"step {step} is already committed under {d.url}", step=step)
    by_file = _pieces_by_file(m)
    written: list[str] = []
    wlock = threading.Lock()

    def copy_file(fname: str) -> int:
        rel = f"{prefix}/{fname}"
        expected = m.files[fname]
        try:
            actual = s.size(rel)
        except FileNotFoundError:
            raise IntegrityError(
                f"step {step}: data file {fname} is missing under {s.url}", step=step, file=fname
            ) from None
        if actual != expected:
            raise IntegrityError(
                f"step {step}: file {fname} is {actual} bytes under {s.url}, the manifest says {expected}",
                step=step,
                file=fname,
            )
        checker = _PieceChecker(by_file.get(fname, [])) if verify else None
        w = d.open_write(rel)
        with wlock:
            written.append(rel)
        try:

            def sink(off: int, data: bytes) -> None:
                if checker is not None:
                    checker.feed(off, data)
                w.write([memoryview(data)])

            _stream(s, rel, expected, chunk_bytes, sink, progress, should_stop)
            if checker is not None:
                probs = checker.problems(step, fname)
                if probs:
                    p = probs[0]
                    raise IntegrityError(
                        f"{p} (source {s.url}); nothing was committed at {d.url}", step=step, file=fname, key=p.key
                    )
            w.close()
        except BaseException:
            try:
                w.abort()
            except Exception as e:  # keep the original error
                log.debug("abort of %s failed: %s", rel, e)
            raise
        return expected

    try:
        sizes = _run_parallel(copy_file, sorted(m.files), threads)
        _check_stop(should_stop)
        d.sync_dir(prefix)
        try:
            d.create_exclusive(manifest_rel, manifest_bytes)
        except FileExistsError:
            raise CheckpointExistsError(
                f"step {step} was committed under {d.url} by another writer during the copy", step=step
            ) from None
    except BaseException:
        _remove_quietly(d, written)
        raise
    nbytes = sum(sizes) + len(manifest_bytes)
    files = len(sizes) + 1
    copied_artifacts: list[str] = []
    if artifacts:
        n, names = copy_artifacts(
            s, d, step, verify=verify, progress=progress, should_stop=should_stop, chunk_bytes=chunk_bytes
        )
        nbytes += n
        files += 2 * len(names)
        copied_artifacts = names
    res = CopyResult(step, True, nbytes, files, time.perf_counter() - t0, tuple(copied_artifacts))
    log.info("copied step %d: %d bytes in %d files, %.2fs -> %s", step, nbytes, files, res.seconds, d.url)
    return res


def _remove_quietly(st: Storage, rels: Iterable[str]) -> None:
    for rel in rels:
        try:
            st.remove(rel)
        except OSError as e:
            log.warning("could not remove %s after a failed copy: %s", st.url_of(rel), e)


def copy_artifacts(
    src: Storage | Any,
    dst: Storage | Any,
    step: int,
    *,
    verify: bool = True,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[int, list[str]]:
    """Copy the artifacts of ``step`` that ``dst`` lacks (data file, then the sidecar last).

    Returns ``(bytes copied, names)``. A corrupt source artifact raises ``IntegrityError`` and is not committed.
    """
    from .artifacts import list_artifacts, sidecar_name

    s, d = as_storage(src), as_storage(dst)
    prefix = step_dir(step)
    have = set(d.list_dir(prefix))
    total = 0
    names = []
    for info in list_artifacts(s, step):
        side = sidecar_name(info.name)
        if side in have:
            continue
        _check_stop(should_stop)
        rel = f"{prefix}/{info.file}"
        state = {"crc": 0, "n": 0}
        w = d.open_write(rel)
        try:

            def sink(off: int, data: bytes, state: dict[str, int] = state, w: Any = w) -> None:
                state["crc"] = crc32c(data, state["crc"])
                state["n"] += len(data)
                w.write([memoryview(data)])

            _stream(s, rel, info.size, chunk_bytes, sink, progress, should_stop)
            if verify and state["crc"] != info.crc32c:
                raise IntegrityError(
                    f"step {step}: artifact {info.name!r} ({info.file}) does not match its sidecar checksum under "
                    f"{s.url} (crc32c {state['crc']:08x}, sidecar {info.crc32c:08x})",
                    step=step,
                    file=info.file,
                    key=f"artifact:{info.name}",
                )
            w.close()
        except BaseException:
            try:
                w.abort()
            except Exception as e:
                log.debug("abort of %s failed: %s", rel, e)
            raise
        d.sync_dir(prefix)
        try:
            d.create_exclusive(f"{prefix}/{side}", s.read_bytes(f"{prefix}/{side}"))
        except FileExistsError:
            continue  # another mirror wrote the same artifact meanwhile
        total += info.size
        names.append(info.name)
    return total, names


def copy_steps(
    src: Storage | Any,
    dst: Storage | Any,
    steps: Iterable[int] | None = None,
    *,
    on_step: Callable[[CopyResult], None] | None = None,
    on_error: Callable[[int, BaseException], None] | None = None,
    **kwargs: Any,
) -> list[CopyResult]:
    """Copy committed steps from ``src`` to ``dst``, oldest first; steps ``dst`` already has in the same
    generation are skipped (one it has only in an older generation gets the new one beside it).

    ``steps`` defaults to every committed step of ``src``; a requested step ``src`` lacks raises
    ``CheckpointNotFoundError`` before anything is copied. ``on_step`` is called after each step (copied or
    skipped). Errors are raised, unless ``on_error`` is given: then it receives ``(step, error)`` and copying
    goes on with the next step (``TransferCancelled`` always stops). ``kwargs`` go to :func:`copy_step`.

    Example::

        copy_steps(src, dst, [100, 200], on_step=lambda r: print(r.step, "copied" if r.copied else "skipped"))
    """
    s, d = as_storage(src), as_storage(dst)
    available = committed_steps(s)
    if steps is None:
        wanted = available
    else:
        wanted = sorted(set(steps))
        absent = [x for x in wanted if x not in set(available)]
        if absent:
            raise CheckpointNotFoundError(
                f"step(s) {', '.join(map(str, absent))} are not committed under {s.url}", step=absent[0]
            )
    have = _generations(d)
    out: list[CopyResult] = []
    for step in wanted:
        if _dst_has(have.get(step), step_files(s, step)):
            res = CopyResult(step, False)
        else:
            try:
                res = copy_step(s, d, step, **kwargs)
            except TransferCancelled:
                raise
            except CheckpointExistsError:
                res = CopyResult(step, False)  # committed by another writer meanwhile: same immutable step
            except Exception as e:
                if on_error is None:
                    raise
                on_error(step, e)
                continue
        out.append(res)
        if on_step is not None:
            on_step(res)
    return out


def sync_once(
    src: Storage | Any,
    dst: Storage | Any,
    *,
    on_step: Callable[[CopyResult], None] | None = None,
    on_error: Callable[[int, BaseException], None] | None = None,
    artifacts: bool = True,
    **kwargs: Any,
) -> list[CopyResult]:
    """One mirroring pass: copy every committed step of ``src`` that ``dst`` lacks, then the artifacts added
    since to steps both already have. Returns what changed: copied steps (``copied=True``) and existing steps
    that received artifacts (``copied=False``, ``artifacts`` non-empty).

    Example::

        sync_once(open_storage("/fast/run"), open_storage("s3://bucket/run"))
    """
    s, d = as_storage(src), as_storage(dst)
    src_gens = _generations(s)
    dst_gens = _generations(d)
    same = {x for x, files in src_gens.items() if _dst_has(dst_gens.get(x), files)}
    todo = [x for x in sorted(src_gens) if x not in same]
    out = copy_steps(s, d, todo, on_step=on_step, on_error=on_error, artifacts=artifacts, **kwargs) if todo else []
    copied = [r for r in out if r.copied or r.artifacts]
    if artifacts:
        pass_kwargs = {k: v for k, v in kwargs.items() if k in ("verify", "progress", "should_stop", "chunk_bytes")}
        for step in sorted(same):
            try:
                n, names = copy_artifacts(s, d, step, **pass_kwargs)
            except TransferCancelled:
                raise
            except Exception as e:
                if on_error is None:
                    raise
                on_error(step, e)
                continue
            if names:
                res = CopyResult(step, False, n, 2 * len(names), 0.0, tuple(names))
                copied.append(res)
                if on_step is not None:
                    on_step(res)
    return copied


def mirror(
    src: Storage | Any,
    dst: Storage | Any,
    *,
    stop: threading.Event,
    interval: float = 30.0,
    on_step: Callable[[CopyResult], None] | None = None,
    on_error: Callable[[int | None, BaseException], None] | None = None,
    **kwargs: Any,
) -> int:
    """Keep ``dst`` a mirror of ``src`` until ``stop`` is set: a :func:`sync_once` pass every ``interval`` s.

    A step that fails (corrupt source, transient storage error) is reported to ``on_error`` and retried on the
    next pass; the loop never dies of it. Setting ``stop`` interrupts a copy in progress (nothing half-copied is
    committed) and returns promptly. Returns the number of steps copied. Deleted source steps stay in ``dst``.

    Example::

        stop = threading.Event()
        threading.Thread(target=mirror, args=(src, dst), kwargs={"stop": stop, "interval": 10}).start()
        ...
        stop.set()
    """
    s, d = as_storage(src), as_storage(dst)
    copied = 0
    reported: dict[int | None, str] = {}

    def err(step: int | None, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        if reported.get(step) == msg:
            log.debug("step %s still failing: %s", step, msg)
            return
        reported[step] = msg
        if on_error is not None:
            on_error(step, e)
        else:
            log.warning("mirror: step %s: %s", step, msg)

    kwargs.setdefault("should_stop", stop.is_set)
    while not stop.is_set():
        try:
            done = sync_once(s, d, on_step=on_step, on_error=err, **kwargs)
            copied += sum(1 for r in done if r.copied)
        except TransferCancelled:
            break
        except Exception as e:  # listing failed (network, permissions): retry on the next pass
            err(None, e)
        stop.wait(interval)
    return copied


__all__ = [
    "CopyResult",
    "Problem",
    "TransferCancelled",
    "VerifyResult",
    "as_storage",
    "committed_steps",
    "copy_artifacts",
    "copy_step",
    "copy_steps",
    "mirror",
    "read_manifest",
    "step_bytes",
    "sync_once",
    "verify_step",
]
