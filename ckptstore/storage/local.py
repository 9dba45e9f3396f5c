"""Local-disk storage: direct ``os.writev`` / ``os.preadv`` from and into tensor memory, real fsync.

Writers start the write-back of what they wrote every 32 MiB (``sync_file_range``, Linux), so the disk works
while the writer still copies into the page cache and the final fsync has little left to wait for.

Hostile roots. The root directory itself is trusted (it may be a symbolic link, e.g. to a mounted disk); nothing
*below* it is. Every path is resolved from the root one component at a time with ``O_NOFOLLOW`` directory file
descriptors (``openat``/``unlinkat``/``mkdirat`` through ``dir_fd``), so a symbolic link anywhere below the root
is never followed — by reads, writes, listings or deletes — and a link swapped in while a call runs is refused,
not followed (:class:`~ckptstore.storage.base.NotRegularFileError`). Reads open only regular files (``O_NOFOLLOW |
O_NONBLOCK``, then ``fstat``: a FIFO cannot block, a device cannot be read) and never read past the size
``fstat`` reported. Writes never write through an existing inode: the old name is unlinked and the file created
anew with ``O_EXCL | O_NOFOLLOW``.

The commit (``create_exclusive``) is exclusive on every filesystem: ``link(2)`` of a complete temp file where
hard links work; else ``renameat2(RENAME_NOREPLACE)`` of it (Linux); else ``O_CREAT | O_EXCL`` of the final name
itself, then write + fsync — exclusive, but the content is visible while incomplete and a crash can leave it torn
(``create_all_or_nothing`` is then False: readers trust it only once its self-checksum verifies). Which one works
is learnt once per storage instance. Directories are created durably: the parent of every directory made is
fsynced, so a new step directory survives a power cut once its commit returned.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat as _stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import fsspec

from .base import Buffer, Entry, NotRegularFileError, Storage, _check_rel

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
log = logging.getLogger("ckptstore")


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
# A directory below the root: never through a symbolic link.
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
# A file to read: never through a symbolic link, never blocking on a FIFO, never a controlling terminal.
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_NOCTTY | _O_CLOEXEC
# A file to write: always a new inode (never through a link, never into a FIFO/device/someone else's inode).
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
# errnos that an O_NOFOLLOW open gives for a symbolic link (Linux/macOS: ELOOP, FreeBSD: EMLINK), or for a
# non-directory opened with O_DIRECTORY (ENOTDIR), or a socket (ENXIO).
_NOT_THAT_ERRNOS = frozenset({errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.ENXIO, errno.EISDIR})
# link(2) answers that mean "no hard links here" (vfat/exfat: EPERM, some FUSE/SMB: ENOSYS/ENOTSUP, overlay
# or bind-mount corner cases: EXDEV), so the commit must do without them.
_NO_LINK_ERRNOS = frozenset(
    {errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, getattr(errno, "EMLINK", -1)}
)
# renameat2(RENAME_NOREPLACE) answers that mean "not supported here" (NFS, old kernels, some FUSE: EINVAL).
_NO_RENAME2_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})
_RENAME_NOREPLACE = 1
# How deep remove_tree descends (a checkpoint step is one or two levels; a hostile tree must not exhaust fds).
_MAX_TREE_DEPTH = 64


def _load_renameat2() -> Callable[[int, str, int, str, int], None] | None:
    """``renameat2(olddirfd, old, newdirfd, new, flags)`` through libc (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
        if fn(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), dst)

    return renameat2


_renameat2 = _load_renameat2()


def _kind_of(mode: int) -> str:
    """What a file mode is, in words (for messages and ``NotRegularFileError.kind``)."""
    if _stat.S_ISREG(mode):
        return "regular file"
    if _stat.S_ISDIR(mode):
        return "directory"
    if _stat.S_ISLNK(mode):
        return "symbolic link"
    if _stat.S_ISFIFO(mode):
        return "FIFO"
    if _stat.S_ISSOCK(mode):
        return "socket"
    if _stat.S_ISCHR(mode):
        return "character device"
    if _stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def _errno_for(kind: str) -> int:
    return {
        "symbolic link": errno.ELOOP,
        "directory": errno.EISDIR,
        "regular file": errno.ENOTDIR,
    }.get(kind, errno.EINVAL)


def _fsync_fd(fd: int) -> None:
    """fsync a directory's fd; filesystems that refuse it on directories are tolerated (files are fsynced)."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES):
            raise


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return
    try:
        _fsync_fd(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data files were fsynced already
    finally:
        os.close(fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _WriteTarget(NamedTuple):
    """Where a ``_LocalWriter`` creates its file: ``name`` in the directory ``dir_fd`` (which it then owns)."""

    dir_fd: int
    name: str
    path: str  # the full path, for messages


# Filesystems on which load() may map shard files (see LocalStorage.map_private): local disks and memory.
_MAP_SAFE_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "bcachefs"})


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (Linux ``/proc/self/mountinfo``; "" if unknown)."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and path != "/":
        path = os.path.dirname(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) < 5 or not rfields:
                    continue
                mnt = fields[4].replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, rfields[0]
    except OSError:
        return ""
    return kind


class LocalStorage(Storage):
    """Storage on a local (or locally mounted) filesystem.

    Symbolic links below the root are never followed and only regular files are read (see the module docstring).

    Example::

        st = LocalStorage("/tmp/ckpt")          # or "file:///tmp/ckpt"
    """

    #: Splitting a read into several smaller ``read_into`` calls costs nothing extra (the I/O layer reads and
    #: checksums slice by slice while the bytes are in the CPU cache).
    small_reads_cheap = True
    #: O_EXCL / link(2) / RENAME_NOREPLACE are exclusive on local filesystems and on NFSv3+ (not NFSv2).
    exclusive_create = True
    has_mtime = True

    def __init__(self, url: str) -> None:
        path = url
        for prefix in ("file://", "local://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        path = os.path.abspath(os.path.expanduser(path))
        super().__init__(f"file://{path}", fsspec.filesystem("file"), path)
        # How create_exclusive commits on this filesystem: "link" until link(2) says it cannot, then "rename2"
        # (renameat2 RENAME_NOREPLACE) until that says it cannot, then "excl" (O_EXCL of the final name).
        self._commit_mode = "link" if _renameat2 is not None else "link-excl"
        self._mode_lock = threading.Lock()
        self._maps_unsafe: bool | None = None  # learnt at the first map_private

    # -- capabilities learnt at the first commit -----------------------------------------------------------
    @property
    def has_links(self) -> bool:  # type: ignore[override]
        """True until a commit found that link(2) does not work on this filesystem."""
        return self._commit_mode.startswith("link")

    @property
    def create_all_or_nothing(self) -> bool:  # type: ignore[override]
        """False once the commit had to fall back to O_EXCL of the final name (see ``Storage``)."""
        return self._commit_mode != "excl"

    def _downgrade(self, frm: str, to: str, why: OSError) -> None:
        """Remember (for this instance) that the commit way ``frm`` does not work here; use ``to`` from now on."""
        with self._mode_lock:
            if self._commit_mode != frm:
                return
            self._commit_mode = to
        lacks = "hard links" if frm.startswith("link") else "renameat2(RENAME_NOREPLACE)"
        how = "rename without replace" if to == "rename2" else "O_EXCL create of the final name (not all-or-nothing)"
        log.info("%s: no %s here (%s); committing with %s from now on", self.url, lacks, why.strerror, how)

    # -- paths ---------------------------------------------------------------------------------------------
    def full(self, rel: str) -> str:
        rel = _check_rel(rel)
        return os.path.join(self.root, rel) if rel else self.root

    @staticmethod
    def _parts(rel: str) -> list[str]:
        rel = _check_rel(rel)
        return rel.split("/") if rel else []

    def _where(self, parts: Sequence[str]) -> str:
        return self.url_of("/".join(parts))

    def _refuse(self, dir_fd: int, parts: Sequence[str], *, want: str, mode: int | None = None) -> NotRegularFileError:
        """The error for ``parts[-1]`` (in ``dir_fd``) not being the ``want`` ("regular file"/"directory")."""
        if mode is None:
            try:
                mode = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return NotRegularFileError(
                    errno.ENOENT, f"{self._where(parts)} vanished while it was opened", self._where(parts),
                    kind="missing",
                )  # fmt: skip
        kind = _kind_of(mode)
        where = self._where(parts)
        if kind == want:  # it was something else a moment ago: another process is changing the root
            return NotRegularFileError(
                errno.EAGAIN, f"{where} changed while it was opened (another process is replacing it); try again",
                where, kind="changing",
            )  # fmt: skip
        if kind == "symbolic link":
            msg = (
                f"{where} is a symbolic link; ckptstore never follows links below the checkpoint root "
                f"(it could lead outside it). Remove it, or replace it with a real {want}"
            )
        else:
            msg = (
                f"{where} is a {kind}, not a {want}; ckptstore refuses to use it. "
                f"Remove it, or replace it with a real {want}"
            )
        return NotRegularFileError(_errno_for(kind), msg, where, kind=kind)

    def _root_fd(self, *, create: bool = False) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)  # the root itself may be a link
        except FileNotFoundError:
            if not create:
                raise
        self._create_root()
        return os.open(self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)

    def _create_root(self) -> None:
        """``mkdir -p`` of the root, fsyncing the parent of every directory made (above the root: trusted)."""
        missing: list[str] = []
        p = self.root
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            _fsync_dir(os.path.dirname(d))

    def _open_dir(self, parts: Sequence[str], *, create: bool = False, durable: bool = True) -> int:
        """An fd of the directory root/parts..., opened one component at a time without following links.

        ``create``: make missing components (each new one's parent is fsynced, so the entry is durable, unless
        ``durable=False``: then ``sync_dir`` before the commit makes them durable, after the data's own flush, when
        a journaling filesystem has already committed the new entry and the parent's fsync costs nothing).
        ``FileNotFoundError`` if a component is missing, ``NotRegularFileError`` if one is not a real directory.
        """
        fd = self._root_fd(create=create)
        try:
            for i, name in enumerate(parts):
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileNotFoundError(
                            errno.ENOENT, "No such file or directory", self._where(parts[: i + 1])
                        ) from None
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass  # made by someone else meanwhile (they fsync it)
                    else:
                        if durable:
                            _fsync_fd(fd)  # the new entry in its parent survives a power cut
                    try:
                        nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError as e:
                        if e.errno in _NOT_THAT_ERRNOS:
                            raise self._refuse(fd, parts[: i + 1], want="directory") from None
                        raise
                except OSError as e:
                    if e.errno in _NOT_THAT_ERRNOS:
                        raise self._refuse(fd, parts[: i + 1], want="directory") from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _dir(self, parts: Sequence[str], *, create: bool = False, durable: bool = True) -> Iterator[int]:
        fd = self._open_dir(parts, create=create, durable=durable)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_read(self, rel: str) -> tuple[int, os.stat_result]:
        """An fd of regular file ``rel`` opened for reading, and its ``fstat`` (the hot path of every read)."""
        parts = self._parts(rel)
        if not parts:
            raise NotRegularFileError(
                errno.EISDIR, f"{self.url} is the checkpoint root, a directory, not a file", self.url, kind="directory"
            )
        dfd = self._open_dir(parts[:-1])
        try:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", self._where(parts)) from None
            except OSError as e:
                if e.errno in _NOT_THAT_ERRNOS:
                    raise self._refuse(dfd, parts, want="regular file") from None
                raise
            try:
                st = os.fstat(fd)
                if not _stat.S_ISREG(st.st_mode):
                    raise self._refuse(dfd, parts, want="regular file", mode=st.st_mode)
                if _O_NONBLOCK:
                    os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
        finally:
            os.close(dfd)
        return fd, st

    # -- listing -------------------------------------------------------------------------------------------
    def list_dir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel``; empty when it does not exist or is not a real directory (a symbolic
        link to a directory is not followed: it lists as empty)."""
        try:
            with self._dir(self._parts(rel)) as fd:
                return sorted(os.listdir(fd))
        except (FileNotFoundError, NotRegularFileError):
            return []

    def list_entries(self, rel: str = "") -> list[Entry]:
        """``os.scandir`` of ``rel`` with ``lstat`` of every entry (symbolic links, FIFOs, sockets, devices are
        ``"other"``). Empty when ``rel`` does not exist or is a regular file; ``NotRegularFileError`` when it
        or a component of it is a symbolic link or special file."""
        try:
            fd = self._open_dir(self._parts(rel))
        except FileNotFoundError:
            return []
        except NotRegularFileError as e:
            if e.kind == "regular file":
                return []
            raise
        out: list[Entry] = []
        try:
            with os.scandir(fd) as it:
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the listing
                    out.append(self._entry(de.name, st))
        finally:
            os.close(fd)
        return sorted(out, key=lambda e: e.name)

    @staticmethod
    def _entry(name: str, st: os.stat_result) -> Entry:
        if _stat.S_ISREG(st.st_mode):
            return Entry(name, "file", st.st_size, st.st_mtime)
        if _stat.S_ISDIR(st.st_mode):
            return Entry(name, "dir", 0, st.st_mtime)
        return Entry(name, "other", 0, st.st_mtime)

    def stat(self, rel: str) -> Entry | None:
        """``lstat`` of ``rel`` (a symbolic link is ``"other"``); None if it or a parent is missing or a parent
        is a regular file; ``NotRegularFileError`` if a parent is a symbolic link or special file."""
        parts = self._parts(rel)
        if not parts:
            try:
                return self._entry("", os.stat(self.root))  # the root: trusted, may be a link
            except FileNotFoundError:
                return None
        try:
            with self._dir(parts[:-1]) as dfd:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except NotRegularFileError as e:
            if e.kind == "regular file":
                return None
            raise
        return self._entry(parts[-1], st)

    def exists(self, rel: str) -> bool:
        """Whether an entry of that name exists (of any kind, a dangling symbolic link included). False when
        the path runs through a symbolic link or special file: nothing below one is inside the root."""
        try:
            return self.stat(rel) is not None
        except NotRegularFileError:
            return False

    def size(self, rel: str) -> int:
        """Byte size of regular file ``rel`` (``lstat``, nothing is opened); ``NotRegularFileError`` otherwise."""
        parts = self._parts(rel)
        if not parts:
            raise NotRegularFileError(
                errno.EISDIR, f"{self.url} is the checkpoint root, a directory, not a file", self.url, kind="directory"
            )
        with self._dir(parts[:-1]) as dfd:
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", self._where(parts)) from None
            if not _stat.S_ISREG(st.st_mode):
                raise self._refuse(dfd, parts, want="regular file", mode=st.st_mode)
        return st.st_size

    # -- writing -------------------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        """Create ``rel`` and its missing parents durably: the parent of every directory made is fsynced."""
        with self._dir(self._parts(rel), create=True):
            pass

    def open_write(self, rel: str, *, borrow: bool = False) -> _LocalWriter:
        # ``borrow`` changes nothing here: every write goes to the kernel before write() returns.
        parts = self._parts(rel)
        if not parts:
            raise NotRegularFileError(
                errno.EISDIR, f"{self.url} is the checkpoint root, not a file", self.url, kind="directory"
            )
        dfd = self._open_dir(parts[:-1], create=True, durable=False)  # sync_dir at the commit makes it durable
        try:
            return _LocalWriter(_WriteTarget(dfd, parts[-1], self.full(rel)))
        except BaseException:
            os.close(dfd)
            raise

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` with ``data`` only if no entry of that name exists (else ``FileExistsError``); durable
        (file and directory fsynced) when it returns. See the module docstring for the three ways."""
        parts = self._parts(rel)
        if not parts:
            raise FileExistsError(errno.EEXIST, "the checkpoint root already exists", self.url)
        final = self.full(rel)
        with self._dir(parts[:-1], create=True) as dfd:
            name = parts[-1]
            if self._commit_mode == "excl" or not self._commit_via_temp(dfd, name, final, data):
                self._commit_in_place(dfd, name, final, data)
            _fsync_fd(dfd)

    def write_hint(self, rel: str, data: bytes) -> None:
        """temp + rename(2), no fsync: a kill never leaves it torn (a reader sees the old or the new content), and
        a lease has no need to survive a power cut, so it costs no disk flush on the save's path."""
        parts = self._parts(rel)
        if not parts:
            raise NotRegularFileError(
                errno.EISDIR, f"{self.url} is the checkpoint root, not a file", self.url, kind="directory"
            )
        with self._dir(parts[:-1], create=True, durable=False) as dfd:
            tmp = f".{parts[-1]}.tmp-{uuid.uuid4().hex}"
            fd = os.open(tmp, _CREATE_FLAGS, 0o644, dir_fd=dfd)
            try:
                _write_all(fd, data)
            except BaseException:
                os.close(fd)
                os.unlink(tmp, dir_fd=dfd)
                raise
            os.close(fd)
            try:
                os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise

    def _commit_via_temp(self, dfd: int, name: str, final: str, data: bytes) -> bool:
        """temp + fsync, then link(2) or renameat2(RENAME_NOREPLACE): all or nothing under ``name``. False
        (nothing done, ``_commit_mode`` now ``"excl"``) when neither works on this filesystem."""
        tmp = f".{name}.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, _CREATE_FLAGS, 0o644, dir_fd=dfd)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                fd = -1
                raise
            mode = self._commit_mode
            if mode.startswith("link"):
                try:
                    # link, not rename: rename(2) would replace a manifest another writer committed a moment ago.
                    os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                    return True
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        if self._linked_anyway(fd, dfd, name):
                            return True
                        raise FileExistsError(errno.EEXIST, "already exists", final) from None
                    if e.errno not in _NO_LINK_ERRNOS:
                        raise
                    self._downgrade(mode, "rename2" if mode == "link" else "excl", e)
            if self._commit_mode == "rename2":
                assert _renameat2 is not None
                try:
                    _renameat2(dfd, tmp, dfd, name, _RENAME_NOREPLACE)
                    return True
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        raise FileExistsError(errno.EEXIST, "already exists", final) from None
                    if e.errno not in _NO_RENAME2_ERRNOS:
                        raise
                    self._downgrade("rename2", "excl", e)
            return False
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass  # renamed into place

    @staticmethod
    def _linked_anyway(fd: int, dfd: int, name: str) -> bool:
        """After link(2) said EEXIST: is ``name`` our temp file after all? (NFS: a retransmitted LINK whose first
        attempt succeeded answers EEXIST.)"""
        try:
            ours = os.fstat(fd)
            there = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        return ours.st_nlink >= 2 and _same_file(ours, there)

    def _commit_in_place(self, dfd: int, name: str, final: str, data: bytes) -> None:
        """O_CREAT|O_EXCL|O_NOFOLLOW of the final name, write, fsync: exclusive (one creator wins, also on
        NFSv3+), but visible while incomplete; on an error the partial file is removed (if it is still ours)."""
        try:
            fd = os.open(name, _CREATE_FLAGS, 0o644, dir_fd=dfd)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "already exists", final) from None
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            try:
                ours = os.fstat(fd)
                there = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if _same_file(ours, there):
                    os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
            os.close(fd)
            raise
        os.close(fd)

    def sync_dir(self, rel: str) -> None:
        """fsync ``rel`` and every directory above it up to the root: the entries written into ``rel`` and the
        entry of ``rel`` itself (made by whichever process or rank created it) survive a power cut."""
        parts = self._parts(rel)
        for depth in range(len(parts), -1, -1):
            try:
                with self._dir(parts[:depth]) as fd:
                    _fsync_fd(fd)
            except OSError:
                pass  # missing, not a real directory, or no fsync on directories: nothing to make durable here

    # -- reading -------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of regular file ``rel`` (whole file by default), never more than the size
        ``fstat`` gave at open; ``EOFError`` if the file ends before ``end``."""
        fd, st = self._open_read(rel)
        try:
            size = st.st_size
            begin = 0 if start is None else start
            if begin < 0 or (end is not None and end < begin):
                raise ValueError(f"invalid byte range [{start}, {end}) for {self.url_of(rel)}")
            if end is not None and end > size:
                raise EOFError(
                    f"short read of {self.url_of(rel)}: wanted {end - begin} bytes at {begin}, the file has {size}"
                )
            want = (end if end is not None else max(size, begin)) - begin
            chunks: list[bytes] = []
            got = 0
            while got < want:
                b = os.pread(fd, want - got, begin + got)
                if not b:
                    break
                chunks.append(b)
                got += len(b)
        finally:
            os.close(fd)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if end is not None and len(data) != want:
            raise EOFError(f"short read of {self.url_of(rel)}: wanted {want} bytes at {begin}, got {len(data)}")
        return data

    def read_into(self, rel: str, offset: int, buffers: Sequence[Buffer]) -> None:
        bufs = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if b.nbytes]
        if not bufs:
            return
        fd, st = self._open_read(rel)
        try:
            total = sum(b.nbytes for b in bufs)
            if offset < 0 or offset + total > st.st_size:
                raise EOFError(
                    f"short read of {self.url_of(rel)} at byte {max(offset, st.st_size)}: file ends early "
                    f"(it has {st.st_size} bytes, wanted {total} at {offset})"
                )
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
        # A mapping shows later changes of the file (copy-on-write covers only our own writes), and touching a page
        # that a truncation removed kills the process (SIGBUS). ckptstore never rewrites or truncates a committed
        # shard (deleting one keeps the mapping valid), so on a local filesystem only a foreign process rewriting
        # files in place could do that. Network and FUSE filesystems, where other hosts write and pages are
        # revalidated, get private copies instead.
        if self._maps_unsafe is None:
            self._maps_unsafe = _fs_type(self.root) not in _MAP_SAFE_FS
        if self._maps_unsafe:
            return None
        fd, st = self._open_read(rel)
        try:
            if st.st_size == 0:
                return None  # mmap refuses empty files
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_COPY)  # MAP_PRIVATE: writes never reach the file
        finally:
            os.close(fd)  # the mapping keeps the file (even once unlinked) until it is released
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            try:
                mm.madvise(mmap.MADV_WILLNEED)  # start reading ahead now: cold files fault in large chunks
            except OSError:
                pass
        return mm

    # -- deleting ------------------------------------------------------------------------------------------
    def remove(self, rel: str) -> None:
        """Unlink entry ``rel`` (a symbolic link itself, never its target); nothing if missing.
        ``NotRegularFileError`` if a parent component is a symbolic link or not a directory."""
        parts = self._parts(rel)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "refusing to remove the checkpoint root", self.url)
        try:
            with self._dir(parts[:-1]) as dfd:
                try:
                    os.unlink(parts[-1], dir_fd=dfd)
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str) -> None:
        """Remove real directory ``rel`` and everything in it; nothing if missing. Never descends into a
        symbolic link (one inside the tree is unlinked itself); ``NotRegularFileError`` if ``rel`` or one of its
        parents is a symbolic link or not a directory. ``""``: everything under the root, then the root."""
        parts = self._parts(rel)
        if not parts:
            try:
                fd = self._root_fd()
            except FileNotFoundError:
                return
            try:
                self._clear_dir(fd, [], 0)
            finally:
                os.close(fd)
            try:
                os.rmdir(self.root)
            except OSError:
                pass  # a root that is a link, or someone wrote into it meanwhile
            return
        try:
            dfd = self._open_dir(parts[:-1])
        except FileNotFoundError:
            return
        try:
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not _stat.S_ISDIR(st.st_mode):
                raise self._refuse(dfd, parts, want="directory", mode=st.st_mode)
            self._remove_tree_at(dfd, parts, 0)
        finally:
            os.close(dfd)

    def _remove_tree_at(self, dfd: int, parts: list[str], depth: int) -> None:
        """Remove directory ``parts[-1]`` in ``dfd`` with all it holds, without following links."""
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno in _NOT_THAT_ERRNOS:
                if depth == 0:
                    raise self._refuse(dfd, parts, want="directory") from None
                # Swapped for a link or file since the listing: it is an entry of the tree, remove it itself.
                try:
                    os.unlink(parts[-1], dir_fd=dfd)
                except FileNotFoundError:
                    pass
                return
            raise
        try:
            self._clear_dir(fd, parts, depth)
        finally:
            os.close(fd)
        try:
            os.rmdir(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            pass

    def _clear_dir(self, fd: int, parts: list[str], depth: int) -> None:
        if depth >= _MAX_TREE_DEPTH:
            raise OSError(
                errno.ELOOP,
                f"{self._where(parts)}: more than {_MAX_TREE_DEPTH} nested directories; refusing to remove a tree "
                "that deep (no checkpoint has one). Remove it by hand",
                self._where(parts),
            )
        with os.scandir(fd) as it:
            entries = [(de.name, de.is_dir(follow_symlinks=False)) for de in it]
        for name, is_dir in entries:
            if is_dir:
                self._remove_tree_at(fd, [*parts, name], depth + 1)
                continue
            try:
                os.unlink(name, dir_fd=fd)  # files, symbolic links (the link, never its target), FIFOs, ...
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                self._remove_tree_at(fd, [*parts, name], depth + 1)  # became a directory since the listing
            except PermissionError as e:
                if e.errno != errno.EPERM or not os.path.isdir(os.path.join(self.root, *parts, name)):
                    raise
                self._remove_tree_at(fd, [*parts, name], depth + 1)  # macOS: unlink of a directory is EPERM

    def remove_dir(self, rel: str) -> None:
        """Remove real directory ``rel`` only if it is empty (one atomic rmdir); nothing if missing or not
        empty. ``NotRegularFileError`` if it or a parent is a symbolic link or not a directory."""
        parts = self._parts(rel)
        if not parts:
            return
        try:
            with self._dir(parts[:-1]) as dfd:
                try:
                    os.rmdir(parts[-1], dir_fd=dfd)  # atomic: fails if a file is (or just got) in there
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        return
                    if e.errno == errno.ENOTDIR:
                        raise self._refuse(dfd, parts, want="directory") from None
                    raise
        except FileNotFoundError:
            pass


class _LocalWriter:
    """A new file ``target.name`` in directory ``target.dir_fd`` (owned and closed by the writer).

    The name is unlinked first and the file created with ``O_EXCL | O_NOFOLLOW``: bytes never go through a
    symbolic link, into a FIFO or device, or into an inode shared with another name (a hard link)."""

    def __init__(self, target: _WriteTarget) -> None:
        self._dir_fd = target.dir_fd
        self._name = target.name
        self._path = target.path
        self._fd: int | None = None
        self._st: os.stat_result
        for attempt in range(3):
            try:
                os.unlink(self._name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            try:
                self._fd = os.open(self._name, _CREATE_FLAGS, 0o644, dir_fd=self._dir_fd)
                self._st = os.fstat(self._fd)
                break
            except FileExistsError:
                if attempt == 2:
                    raise FileExistsError(
                        errno.EEXIST, "another writer keeps creating this file at the same time", self._path
                    ) from None
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
        self._close_dir()  # kept when fsync failed: abort() then removes the file

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._dir_fd < 0:
            return  # closed successfully before: the file is complete and stays
        try:
            there = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
            if _same_file(self._st, there):  # still our file, not one another writer made since
                os.unlink(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        finally:
            self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd >= 0:
            fd, self._dir_fd = self._dir_fd, -1
            os.close(fd)
