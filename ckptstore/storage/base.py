"""Storage layer: byte-level access to one checkpoint root, over fsspec or direct OS calls.

The layer knows nothing about checkpoints: it writes files from lists of buffers, reads byte ranges into caller
memory, lists names (or typed :class:`Entry` rows) and does one exclusive create-only write (the commit). Paths
given to it are *relative* to the root and use ``/``. Errors are built-in exceptions (``FileNotFoundError``,
``FileExistsError``, ``OSError``, ``EOFError`` for short reads, :class:`NotRegularFileError` — an ``OSError`` —
for a symlink, FIFO, device or directory where a regular file or a real directory is required); the layers above
turn them into ``ckptstore.errors`` types with context.

What a backend can do is declared by class attributes (``small_reads_cheap``, ``exclusive_create``,
``create_all_or_nothing``, ``has_links``, ``has_mtime``, ``preferred_file_bytes``), documented on :class:`Storage`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import mmap
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import fsspec

log = logging.getLogger("ckptstore")

Buffer = memoryview

# fsspec filesystems with real directories, where an empty one is removed by ``remove_dir``.
_DIR_PROTOCOLS = frozenset({"memory", "file", "local"})


EntryKind = Literal["file", "dir", "other"]


@dataclass(frozen=True)
class Entry:
    """One directory entry as the storage sees it, never following a symbolic link.

    ``kind`` is ``"file"`` for a regular file (an object on an object store), ``"dir"`` for a real directory (a
    common prefix on an object store) and ``"other"`` for anything else: a symbolic link (whatever it points
    to), a FIFO, a socket, a device. ``size`` is the file's byte size (0 for directories and others); ``mtime``
    the last modification time in seconds since the epoch, or None where the backend does not report one.
    """

    name: str
    kind: EntryKind
    size: int
    mtime: float | None


class NotRegularFileError(OSError):
    """A path under the root is not what the storage layer accepts there: a symbolic link (never followed), a
    FIFO, socket or device (never opened for reading: it could block or never end), a directory where a file is
    expected, or a file where a directory is expected.

    ``errno`` tells which: ``ELOOP`` (symbolic link), ``EISDIR`` (directory), ``ENOTDIR`` (a path component is
    not a directory), ``EINVAL`` (FIFO, socket, device). ``kind`` names it in words ("symbolic link", "FIFO",
    ...), ``filename`` is the path. The message says what to do: remove or replace the entry.
    """

    def __init__(self, *args: object, kind: str = "") -> None:
        # ``(errno, message, path)`` like ``OSError``; also a bare message (the manager builds typed copies so).
        super().__init__(*args)
        self.kind = kind

    def __str__(self) -> str:  # OSError would print "[Errno 40] ...: 'path'" around the message
        return str(self.strerror) if self.strerror else super().__str__()


def _info_mtime(info: dict[str, Any]) -> float | None:
    """The modification time in an fsspec info dict (``mtime``, S3 ``LastModified``, ``created``), or None."""
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                try:
                    v = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
                except ValueError:
                    continue
        if isinstance(v, _dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=_dt.timezone.utc)
            v = v.timestamp()
        try:
            t = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(t):
            return t
    return None


def _entry_from_info(name: str, info: dict[str, Any]) -> Entry:
    t = info.get("type")
    kind: EntryKind = "file" if t == "file" else "dir" if t in ("directory", "dir") else "other"
    if info.get("islink"):
        kind = "other"
    try:
        size = int(info.get("size") or 0) if kind == "file" else 0
    except (TypeError, ValueError):
        size = 0
    return Entry(name, kind, max(0, size), _info_mtime(info))


class FileWriter(Protocol):
    """A file being written. ``close()`` makes it durable (fsync where the backend has one)."""

    def write(self, buffers: Sequence[Buffer]) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def _check_rel(rel: str) -> str:
    # The storage layer is the last line of defence: a relative path must never climb out of the root.
    if rel.startswith("/") or "\\" in rel or "://" in rel:
        raise PermissionError(f"refusing non-relative storage path {rel!r}")
    norm = posixpath.normpath(rel) if rel else ""
    if norm == ".":
        norm = ""
    if norm.startswith("..") or "/../" in f"/{norm}/":
        raise PermissionError(f"refusing storage path {rel!r}: it escapes the checkpoint root")
    return norm


class Storage:
    """Generic fsspec storage rooted at ``url``; works for ``memory://`` and any fsspec filesystem.

    Subclasses specialise the hot paths (``LocalStorage`` with ``os.writev``/``os.preadv`` and real fsync,
    ``S3Storage`` with parallel multipart uploads and ranged GETs).

    Example::

        st = open_storage("memory://run-1")
        st.write_bytes("a/b.bin", b"hello")
        assert st.read_bytes("a/b.bin", 1, 3) == b"el"
    """

    # -- capabilities (class attributes; a backend overrides what differs) ---------------------------------
    #: Splitting one read into many smaller ``read_into`` calls costs about nothing extra (local disk: the I/O
    #: layer then reads and checksums slice by slice while the bytes are in the CPU cache). False where every
    #: read is a request with its own latency (object stores, generic fsspec).
    small_reads_cheap: bool = False
    #: ``create_exclusive`` has exactly one winner among concurrent writers of the same name, also across
    #: processes and hosts; every other writer gets ``FileExistsError``. (Generic fsspec: as exclusive as the
    #: filesystem's mode ``"x"`` is.)
    exclusive_create: bool = True
    #: A name made by ``create_exclusive`` appears with its complete content at once: a reader never sees a
    #: partial file under it, and a crash never leaves a torn one (link(2), rename without replace, one PUT).
    #: False when the backend had to create the final name first and then write it (``LocalStorage`` on a
    #: filesystem without hard links and without ``RENAME_NOREPLACE``): readers must then trust the content
    #: only once its own checksum verifies, and a crash can leave a torn file holding the name.
    create_all_or_nothing: bool = True
    #: The backend commits with hard links (link(2) works on this filesystem). Informational: what readers
    #: rely on is ``create_all_or_nothing``.
    has_links: bool = False
    #: ``list_entries``/``stat`` report ``Entry.mtime``, so ages (gc / retention ``min_age``) can be told. Where
    #: False, every age is unknown and age-based protection of in-progress saves cannot work.
    has_mtime: bool = True
    #: Largest shard file worth planning on this backend (None: no preference, ``IOOptions.file_bytes`` rules).
    preferred_file_bytes: int | None = None

    def __init__(self, url: str, fs: Any, root: str) -> None:
        self.url = url.rstrip("/")
        self.fs = fs
        self.root = root.rstrip("/")

    # -- paths -------------------------------------------------------------------------------------------
    def full(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self.url}/{rel}" if rel else self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- listing -----------------------------------------------------------------------------------------
    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        try:
            entries = self.fs.ls(self.full(rel), detail=False)
        except FileNotFoundError:
            return []
        base = self.full(rel).rstrip("/")
        out = []
        for e in entries:
            e = str(e).rstrip("/")
            name = e[len(base) + 1 :] if e.startswith(base + "/") else posixpath.basename(e)
            if name and "/" not in name:
                out.append(name)
        return sorted(set(out))

    def list_entries(self, rel: str = "") -> list[Entry]:
        """The entries directly under ``rel`` with their kind, size and mtime, sorted by name, in one listing
        call; never follows a symbolic link. Empty when ``rel`` does not exist or is not a directory.

        Here (generic fsspec, also the default for S3): objects are ``"file"``, common prefixes ``"dir"``,
        anything else the filesystem reports ``"other"``; ``mtime`` from ``LastModified``/``mtime``/``created``.
        """
        path = self.full(rel)
        self._forget_cached(path)
        try:
            infos = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = path.rstrip("/")
        out: dict[str, Entry] = {}
        for info in infos:
            if not isinstance(info, dict):
                continue
            full = str(info.get("name", "")).rstrip("/")
            if not full or full == base:
                continue  # ``ls`` of a file lists the file itself: a file has no entries
            name = full[len(base) + 1 :] if full.startswith(base + "/") else posixpath.basename(full)
            if name and "/" not in name and name not in out:
                out[name] = _entry_from_info(name, info)
        return [out[k] for k in sorted(out)]

    def stat(self, rel: str) -> Entry | None:
        """The entry ``rel`` itself (kind, size, mtime) without following a symbolic link; None if missing."""
        path = self.full(rel)
        self._forget_cached(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return _entry_from_info(posixpath.basename(_check_rel(rel)), info)

    def _forget_cached(self, path: str) -> None:
        # A listing cached by fsspec (s3fs caches them) would hide what other processes wrote since.
        forget = getattr(self.fs, "invalidate_cache", None)
        if forget is not None:
            try:
                forget(path)
            except (OSError, ValueError, TypeError, NotImplementedError):  # only costs freshness
                log.debug("could not invalidate the listing cache of %s", path, exc_info=True)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.full(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.full(rel)))

    # -- writing -----------------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.full(rel), exist_ok=True)

    def open_write(self, rel: str, *, borrow: bool = False) -> FileWriter:
        """A writer for ``rel``. ``borrow=True`` promises that buffers passed to ``write`` stay valid and
        unchanged until ``close`` returns, so a backend may send them later without copying (S3 does)."""
        self.makedirs(posixpath.dirname(_check_rel(rel)))
        return _FsspecWriter(self.fs, self.full(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        w = self.open_write(rel)
        try:
            w.write([memoryview(data)])
        except BaseException:
            w.abort()
            raise
        w.close()

    def check_commit_support(self) -> None:
        """Raise :class:`~ckptstore.errors.UnsupportedStorageError` when this storage cannot commit a step safely
        (an S3 server that ignores conditional writes). A save calls it before it writes anything, so a refusal
        costs no uploads. Default: nothing to check."""

    def write_hint(self, rel: str, data: bytes) -> None:
        """Write a small advisory file (a save's lease): whole or absent for readers, even if the writer is
        killed, but not made durable (no fsync; it may vanish in a power cut). Its readers must treat it as a hint.
        Default: ``write_bytes`` (one PUT on object stores)."""
        self.write_bytes(rel, data)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically, only if ``rel`` does not exist (else ``FileExistsError``)."""
        path = self.full(rel)
        self.makedirs(posixpath.dirname(_check_rel(rel)))
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except (ValueError, NotImplementedError):
            # Backends without exclusive create: check then write. Not atomic across processes.
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

    def sync_dir(self, rel: str) -> None:
        """Make the entries of directory ``rel`` and of each directory above it (within the root) durable; called
        before a commit. Files created by ``open_write`` may leave new directories durable only after this.
        No-op off local disk."""

    # -- reading -----------------------------------------------------------------------------------------
    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self.fs.cat_file(self.full(rel), start=start, end=end)
        if start is not None and end is not None and len(data) != end - start:
            raise EOFError(f"short read of {self.url_of(rel)}: wanted {end - start} bytes, got {len(data)}")
        return bytes(data)

    def read_into(self, rel: str, offset: int, buffers: Sequence[Buffer]) -> None:
        """Fill ``buffers`` (in order) from the file bytes starting at ``offset``; ``EOFError`` if short."""
        total = sum(b.nbytes for b in buffers)
        if total == 0:
            return
        data = self.read_bytes(rel, offset, offset + total)
        pos = 0
        for b in buffers:
            n = b.nbytes
            b.cast("B")[:] = data[pos : pos + n]
            pos += n

    def map_private(self, rel: str) -> mmap.mmap | None:
        """A copy-on-write memory map of the whole file (writes to it stay private), or None where files are not
        local or are empty. Tensors on it read the page cache in place instead of copying into fresh memory."""
        return None

    # -- deleting ----------------------------------------------------------------------------------------
    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.full(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str) -> None:
        try:
            self.fs.rm(self.full(rel), recursive=True)
        except FileNotFoundError:
            pass

    def remove_dir(self, rel: str) -> None:
        """Remove directory ``rel`` only if it is empty — one atomic check-and-remove where the filesystem has
        directories; object stores have none, so nothing to do there. Never removes files: a concurrent writer
        that just created one under ``rel`` keeps it (unlike listing, then ``remove_tree``)."""
        rel = _check_rel(rel)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if not rel or not _DIR_PROTOCOLS.intersection(protocols):
            return
        try:
            self.fs.rmdir(self.full(rel))
        except (OSError, NotImplementedError, ValueError):
            pass  # not empty (someone else's files are there), already gone

    def abort_incomplete_uploads(self, rel_prefix: str, *, older_than_seconds: float = 0.0) -> int:
        """Abort unfinished multipart uploads under ``rel_prefix``; backends without them have none (0)."""
        return 0

    def close(self) -> None:
        """Release resources (thread pools, sessions)."""


class _FsspecWriter:
    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        self._f = fs.open(path, "wb")

    def write(self, buffers: Sequence[Buffer]) -> None:
        for b in buffers:
            self._f.write(b)

    def close(self) -> None:
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            try:
                self._fs.rm_file(self._path)
            except OSError:
                pass


def open_storage(url: str, storage_options: dict[str, Any] | None = None, *, io: Any = None) -> Storage:
    """Open the storage for ``url`` (a local path, ``file://``, ``memory://``, ``s3://`` or any fsspec URL).

    ``storage_options`` is passed to fsspec unchanged; ``io`` (an ``IOOptions``) tunes backends that use it
    (S3: part size, in-flight bytes, read range size).
    """
    opts = dict(storage_options or {})
    url = str(url)
    if "://" not in url or url.startswith("file://") or url.startswith("local://"):
        from .local import LocalStorage

        if opts:
            log.debug("storage_options are ignored for local paths: %s", sorted(opts))
        return LocalStorage(url)
    protocol = url.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        from .s3 import S3Storage

        return S3Storage(url, opts, io=io)
    fs, root = fsspec.core.url_to_fs(url, **opts)
    return Storage(url, fs, root)
