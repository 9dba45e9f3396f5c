"""Storage layer: byte-level access to one checkpoint root, over fsspec or direct OS calls.

The layer knows nothing about checkpoints: it writes files from lists of buffers, reads byte ranges into caller
memory, lists names and does one atomic create-only write (the commit). Paths given to it are *relative* to the
root and use ``/``. Errors are built-in exceptions (``FileNotFoundError``, ``FileExistsError``, ``OSError``,
``EOFError`` for short reads); the layers above turn them into ``ckptstore.errors`` types with context.
"""

from __future__ import annotations

import logging
import mmap
import posixpath
from collections.abc import Sequence
from typing import Any, Protocol

import fsspec

log = logging.getLogger("ckptstore")

Buffer = memoryview

# fsspec filesystems with real directories, where an empty one is removed by ``remove_dir``.
_DIR_PROTOCOLS = frozenset({"memory", "file", "local"})


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

    #: True when ``create_exclusive`` is atomic against concurrent writers of other processes.
    atomic_create: bool = True
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
        """Make directory entries durable (no-op off local disk)."""

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
