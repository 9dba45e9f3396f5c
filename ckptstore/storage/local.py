"""Local-disk storage: direct ``os.writev`` / ``os.preadv`` from and into tensor memory, real fsync.

Writers start the write-back of what they wrote every 32 MiB (``sync_file_range``, Linux), so the disk works
while the writer still copies into the page cache and the final fsync has little left to wait for.
"""

from __future__ import annotations

import errno
import mmap
import os
import posixpath
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence

import fsspec

from .base import Buffer, Storage, _check_rel

# Linux caps one writev/preadv call at IOV_MAX buffers.
_IOV_MAX = 1024
# Start write-back of every this many bytes written (sync_file_range), so the disk works while the writer is
# still copying into the page cache; the fsync at close then has little left to wait for.
_WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)`` through libc (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: errors are ignored, fsync decides durability

    return start_writeback


_start_writeback = _load_sync_file_range()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data files were fsynced already
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """Storage on a local (or locally mounted) filesystem.

    Example::

        st = LocalStorage("/tmp/ckpt")          # or "file:///tmp/ckpt"
    """

    #: Splitting a read into several smaller ``read_into`` calls costs nothing extra (the I/O layer reads and
    #: checksums slice by slice while the bytes are in the CPU cache).
    small_reads_cheap = True

    def __init__(self, url: str) -> None:
        path = url
        for prefix in ("file://", "local://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        path = os.path.abspath(os.path.expanduser(path))
        super().__init__(f"file://{path}", fsspec.filesystem("file"), path)

    def full(self, rel: str) -> str:
        rel = _check_rel(rel)
        return os.path.join(self.root, rel) if rel else self.root

    def list_dir(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.full(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.full(rel))

    def size(self, rel: str) -> int:
        return os.stat(self.full(rel)).st_size

    def makedirs(self, rel: str) -> None:
        os.makedirs(self.full(rel), exist_ok=True)

    def open_write(self, rel: str, *, borrow: bool = False) -> _LocalWriter:
        # ``borrow`` changes nothing here: every write goes to the kernel before write() returns.
        self.makedirs(posixpath.dirname(_check_rel(rel)))
        return _LocalWriter(self.full(rel))

    def create_exclusive(self, rel: str, data: bytes) -> None:
        # temp + fsync, then link(2): atomic and create-only, unlike rename(2) which would replace a
        # manifest another writer committed a moment earlier.
        final = self.full(rel)
        d = os.path.dirname(final)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            try:
                os.link(tmp, final)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise FileExistsError(errno.EEXIST, "already exists", final) from None
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # No hard links on this filesystem: exclusive check + rename (not race-free).
                if os.path.exists(final):
                    raise FileExistsError(errno.EEXIST, "already exists", final) from None
                os.rename(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(d)

    def sync_dir(self, rel: str) -> None:
        _fsync_dir(self.full(rel))

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(self.full(rel), "rb") as f:
            if start is None:
                return f.read()
            f.seek(start)
            want = None if end is None else end - start
            data = f.read() if want is None else f.read(want)
        if want is not None and len(data) != want:
            raise EOFError(f"short read of {self.url_of(rel)}: wanted {want} bytes at {start}, got {len(data)}")
        return data

    def read_into(self, rel: str, offset: int, buffers: Sequence[Buffer]) -> None:
        bufs = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if b.nbytes]
        if not bufs:
            return
        fd = os.open(self.full(rel), os.O_RDONLY)
        try:
            pos = offset
            i = 0
            while i < len(bufs):
                batch = bufs[i : i + _IOV_MAX]
                want = sum(b.nbytes for b in batch)
                got = os.preadv(fd, batch, pos)
                if got == want:
                    pos += got
                    i += len(batch)
                    continue
                if got == 0:
                    raise EOFError(f"short read of {self.url_of(rel)} at byte {pos}: file ends early")
                # Partial read: skip the fully filled buffers, shrink the partially filled one.
                pos += got
                while got and got >= bufs[i].nbytes:
                    got -= bufs[i].nbytes
                    i += 1
                if got:
                    bufs[i] = bufs[i][got:]
        finally:
            os.close(fd)

    def map_private(self, rel: str) -> mmap.mmap | None:
        fd = os.open(self.full(rel), os.O_RDONLY)
        try:
            if os.fstat(fd).st_size == 0:
                return None  # mmap refuses empty files
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE: writes never reach the file
        finally:
            os.close(fd)  # the mapping keeps the file (even once unlinked) until it is released
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            try:
                mm.madvise(mmap.MADV_WILLNEED)  # start reading ahead now: cold files fault in large chunks
            except OSError:
                pass
        return mm

    def remove(self, rel: str) -> None:
        try:
            os.unlink(self.full(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.full(rel), ignore_errors=True)

    def remove_dir(self, rel: str) -> None:
        if not _check_rel(rel):
            return
        try:
            os.rmdir(self.full(rel))  # atomic: fails if a file is (or just got) in there
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise


class _LocalWriter:
    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = 0  # bytes written so far
        self._flushed = 0  # write-back started up to here

    def write(self, buffers: Sequence[Buffer]) -> None:
        assert self._fd is not None
        bufs = [b for b in buffers if b.nbytes]
        i = 0
        while i < len(bufs):
            batch = bufs[i : i + _IOV_MAX]
            n = os.writev(self._fd, batch)
            self._pos += n
            # Short writes happen (signals, pipes, some filesystems): advance through the batch.
            while n and n >= bufs[i].nbytes:
                n -= bufs[i].nbytes
                i += 1
            if n:
                bufs[i] = bufs[i][n:]
        if _start_writeback is not None and self._pos - self._flushed >= _WRITEBACK_BYTES:
            _start_writeback(self._fd, self._flushed, self._pos - self._flushed)
            self._flushed = self._pos

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
