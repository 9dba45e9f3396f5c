"""S3 storage: parallel multipart uploads, parallel ranged GETs into caller memory, conditional-PUT commits.

The root URL and ``storage_options`` go to s3fs unchanged (``self.fs`` is the s3fs filesystem, handy for tools);
the data path uses one synchronous botocore client built from the same options (credentials, endpoint, region,
``config_kwargs``, ``s3_additional_kwargs``, ``requester_pays``) plus a thread pool, because that client can send
a part straight from a ``memoryview`` and ``readinto`` a response body straight into tensor memory, while
sockets release the GIL. Its own retries are switched off: every request goes through :class:`RetryPolicy`,
so there is exactly one retry loop.

Client defaults that differ from botocore's, unless ``config_kwargs`` sets them: no SHA-256 of the payload on
plain-HTTP endpoints (``s3.payload_signing_enabled=False``) and checksums only where the API requires them
(``request_checksum_calculation="when_required"``). Each costs a full pass over every byte on the client's
CPU; end-to-end integrity comes from the crc32c of every tensor in the manifest, checked on restore.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import http.client
import importlib
import io
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import fsspec

from ..errors import StorageError, UnsupportedStorageError
from ..options import IOOptions
from .base import Buffer, Entry, Storage, _check_rel
from .retry import RetryPolicy, _storage_error, attach_connection, is_not_implemented, s3_error_info

log = logging.getLogger("ckptstore")

MAX_PARTS = 10_000  # S3 limit per multipart upload
_DELETE_BATCH = 1000  # S3 limit per DeleteObjects request
_FALLBACK_READ = 8 << 20
#: Name prefix of the objects that probe a server for conditional writes (directly under the root).
PROBE_PREFIX = ".ckptstore-probe-"
#: gc removes probe objects only when they are older than this (a younger one may be in use by another process).
PROBE_MIN_AGE_SECONDS = 600.0


def _byte_view(b: Buffer | bytes | bytearray) -> memoryview:
    mv = b if isinstance(b, memoryview) else memoryview(b)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class _Budget:
    """Bytes staged or in flight for uploads, shared by every writer of one storage.

    A request waits while the budget is exhausted *and* some part is in flight: an in-flight part always
    finishes and frees its share, so waiting is safe. With nothing in flight it proceeds over the limit
    (by at most one part per open writer) rather than deadlock on writers that each hold a half-filled buffer.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.inflight = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used + n > self.limit and self.inflight > 0:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def start_part(self) -> None:
        with self._cond:
            self.inflight += 1

    def end_part(self, n: int) -> None:
        with self._cond:
            self.inflight -= 1
            self.used -= n
            self._cond.notify_all()


class _BufferPool:
    """Part-sized staging buffers, kept warm across writers and saves (first touch is slow on this hardware)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class S3Storage(Storage):
    """Storage on S3 (or any S3-compatible endpoint) under ``s3://bucket/prefix``.

    - ``create_exclusive`` is one ``PutObject`` with ``If-None-Match: *`` (412 → ``FileExistsError``);
    - ``open_write`` returns a writer doing a parallel multipart upload (parts of ``io.part_bytes``, staged and
      in-flight bytes bounded by ``io.max_inflight_bytes``); files smaller than a part are one ``PutObject``;
    - ``read_into`` fetches ranges of ``io.read_chunk_bytes`` in parallel straight into the caller's buffers;
    - listings are never cached, so objects written by other processes are seen at once.

    All methods may be called from several threads at once.

    Example::

        st = S3Storage("s3://bucket/run-7", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}})
        w = st.open_write("step-000000000001/rank0.safetensors")
        w.write([memoryview(header), memoryview(tensor.numpy()).cast("B")])
        w.close()
        st.create_exclusive("step-000000000001/manifest.json", manifest_bytes)
        st.read_into("step-000000000001/rank0.safetensors", 8, [memoryview(out.numpy()).cast("B")])
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any],
        *,
        io: IOOptions | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        url = str(url)
        if url.startswith("s3a://"):
            url = "s3://" + url[len("s3a://") :]
        super().__init__(url, fs, root)
        bucket, _, prefix = self.root.partition("/")
        if not bucket:
            raise ValueError(f"S3 URL without a bucket: {url!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.io = io or IOOptions()
        self.retry = retry or RetryPolicy()
        per_part = max(1, self.io.max_inflight_bytes // self.io.part_bytes)
        self._workers = int(min(64, max(2, self.io.threads, per_part)))
        self._budget = _Budget(self.io.max_inflight_bytes)
        self._buffers = _BufferPool(self.io.part_bytes, per_part)
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._op_params: dict[str, frozenset[str]] = {}
        self._probe_lock = threading.Lock()
        self._conditional: bool | None = None  # does the server enforce If-None-Match? (None: not probed yet)
        self._conditional_reason = ""  # why not, when the server rejected the condition
        self._warned_single_writer = False
        self._multipart_listing = True  # False once the server said ListMultipartUploads is not implemented
        self._multipart_abort = True  # False once the server said AbortMultipartUpload is not implemented

    @property
    def preferred_file_bytes(self) -> int:  # type: ignore[override]
        # Half the single-PUT limit: files of packed tensors (at most one chunk over the target) plus their
        # header stay single PutObjects, which cost the server less than multipart uploads and their completion.
        return max(self.io.part_bytes, self.io.single_put_bytes // 2)

    # -- plumbing ----------------------------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        rel = _check_rel(rel)
        if self.prefix and rel:
            return f"{self.prefix}/{rel}"
        return self.prefix or rel

    def _dir_prefix(self, rel: str) -> str:
        key = self._key(rel)
        return f"{key}/" if key else ""

    def _check_fork(self) -> None:
        # A forked child inherits dead pool threads and connections that belong to the parent.
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._client = None
                    self._pool = None
                    self._budget = _Budget(self.io.max_inflight_bytes)
                    self._buffers = _BufferPool(self.io.part_bytes, self._buffers.keep)
                    self._pid = os.getpid()

    @property
    def client(self) -> Any:
        """The botocore S3 client of the data path (created on first use; thread-safe)."""
        self._check_fork()
        c = self._client
        if c is None:
            with self._lock:
                if self._client is None:
                    self._client = _make_client(self.fs, 2 * self._workers + 16)
                c = self._client
        return c

    @property
    def pool(self) -> ThreadPoolExecutor:
        self._check_fork()
        p = self._pool
        if p is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ckptstore-s3")
                p = self._pool
        return p

    def _params(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """Request parameters plus the user's ``s3_additional_kwargs``/``requester_pays`` the operation accepts."""
        names = self._op_params.get(op)
        if names is None:
            model = self.client.meta.service_model.operation_model(op)
            shape = model.input_shape
            names = frozenset(shape.members) if shape is not None else frozenset()
            self._op_params[op] = names
        extra = {**getattr(self.fs, "s3_additional_kwargs", {}), **getattr(self.fs, "req_kw", {})}
        out = {k: v for k, v in extra.items() if k in names}
        out.update(kwargs)
        out["Bucket"] = self.bucket
        return out

    def _call(self, op: str, method: str, key: str, **kwargs: Any) -> Any:
        params = self._params(op, **kwargs)
        fn = getattr(self.client, method)
        return self._retry(lambda: fn(**params), op, self._display(key))

    def _call_with_body(self, op: str, method: str, key: str, views: list[memoryview], **kwargs: Any) -> Any:
        """``_call`` with a request body made of ``views``: sent as they are, re-read from the start on a retry."""
        params = self._params(op, **kwargs)
        fn = getattr(self.client, method)
        if len(views) == 1:
            return self._retry(lambda: fn(Body=views[0], **params), op, self._display(key))
        return self._retry(lambda: fn(Body=_ViewsBody(views), **params), op, self._display(key))

    def _retry(self, fn: Callable[[], Any], op: str, display: str) -> Any:
        """``fn`` through the retry policy, bounded by ``io.request_deadline_seconds`` (every S3 request)."""
        return self.retry.call(
            fn, op=op, key=display, deadline=self.io.request_deadline_seconds, endpoint=self.endpoint
        )

    @property
    def endpoint(self) -> str | None:
        """The server's URL (for messages); None before the client exists."""
        c = self._client
        return str(c.meta.endpoint_url) if c is not None else None

    def _display(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _invalidate(self, rel: str) -> None:
        # Keep s3fs's listing cache honest for tools that use ``self.fs`` next to this storage.
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.full(rel))

    # -- listing -----------------------------------------------------------------------------------------
    def _iter_list(self, prefix: str, delimiter: str | None, max_keys: int | None = None) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            if max_keys:
                kw["MaxKeys"] = max_keys
            resp = self._call("ListObjectsV2", "list_objects_v2", prefix, **kw)
            yield resp
            if max_keys or not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:
                return

    def list_dir(self, rel: str = "") -> list[str]:
        prefix = self._dir_prefix(rel)
        names: set[str] = set()
        for resp in self._iter_list(prefix, "/"):
            for cp in resp.get("CommonPrefixes") or ():
                name = cp["Prefix"][len(prefix) :].strip("/")
                if name:
                    names.add(name)
            for obj in resp.get("Contents") or ():
                name = obj["Key"][len(prefix) :]
                if name and "/" not in name:
                    names.add(name)
        return sorted(names)

    def list_entries(self, rel: str = "") -> list[Entry]:
        # One paginated ListObjectsV2 through this backend's own client: the same retries, typed errors (a missing
        # bucket is an error, a missing prefix is empty) and consistency as list_dir.
        prefix = self._dir_prefix(rel)
        out: dict[str, Entry] = {}
        for resp in self._iter_list(prefix, "/"):
            for cp in resp.get("CommonPrefixes") or ():
                name = cp["Prefix"][len(prefix) :].strip("/")
                if name and "/" not in name:
                    out.setdefault(name, Entry(name, "dir", 0, None))
            for obj in resp.get("Contents") or ():
                name = obj["Key"][len(prefix) :]
                if name and "/" not in name:
                    mtime = obj.get("LastModified")
                    ts = mtime.timestamp() if hasattr(mtime, "timestamp") else None
                    out[name] = Entry(name, "file", max(0, int(obj.get("Size") or 0)), ts)
        return [out[k] for k in sorted(out)]

    def stat(self, rel: str) -> Entry | None:
        name = posixpath.basename(_check_rel(rel))
        if _check_rel(rel):
            try:
                head = self._head(rel)
                mtime = head.get("LastModified")
                ts = mtime.timestamp() if hasattr(mtime, "timestamp") else None
                return Entry(name, "file", int(head.get("ContentLength") or 0), ts)
            except FileNotFoundError:
                pass
        return Entry(name, "dir", 0, None) if self.exists(rel) else None

    def _head(self, rel: str) -> dict[str, Any]:
        key = self._key(rel)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "the storage root is not an object", self.url)
        return self._call("HeadObject", "head_object", key, Key=key)  # type: ignore[no-any-return]

    def exists(self, rel: str) -> bool:
        if _check_rel(rel):
            try:
                self._head(rel)
                return True
            except FileNotFoundError:
                pass
        # S3 has no directories: a "directory" exists when some key lies under it.
        for resp in self._iter_list(self._dir_prefix(rel), None, max_keys=1):
            if resp.get("KeyCount", len(resp.get("Contents") or ())):
                return True
        return False

    def size(self, rel: str) -> int:
        return int(self._head(rel)["ContentLength"])

    # -- writing -----------------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        _check_rel(rel)  # S3 has no directories to create

    def open_write(self, rel: str, *, borrow: bool = False) -> _S3Writer:
        key = self._key(rel)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "cannot write the storage root", self.url)
        return _S3Writer(self, rel, key, borrow=borrow)

    def write_bytes(self, rel: str, data: bytes) -> None:
        view = _byte_view(data)
        if view.nbytes >= self.io.part_bytes:
            super().write_bytes(rel, data)
            return
        key = self._key(rel)
        self._call("PutObject", "put_object", key, Key=key, Body=view)
        self._invalidate(rel)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """One ``PutObject`` with ``If-None-Match: *``: atomic, create-only (412 → ``FileExistsError``).

        The first call checks that the server enforces the condition (:meth:`check_conditional_writes`); on one
        that does not, this raises ``UnsupportedStorageError`` — or, with ``io.s3_single_writer``, checks for
        an existing object and then writes (not atomic: one writer only).
        """
        key = self._key(rel)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "cannot write the storage root", self.url)
        body = _byte_view(data)
        if not self.check_conditional_writes():
            self._create_single_writer(rel, key, body)
            return
        params = self._params("PutObject", Key=key, Body=body, IfNoneMatch="*")
        attempts = 0

        def put() -> Any:
            nonlocal attempts
            attempts += 1
            return self.client.put_object(**params)

        try:
            self._retry(put, "PutObject(If-None-Match)", self._display(key))
        except FileExistsError:
            # A retried PUT may have landed the first time with its answer lost: then the 412 is our own write.
            if not (attempts > 1 and self._has_content(key, body)):
                raise
            log.info("conditional PUT of %s succeeded on an earlier attempt", self._display(key))
        finally:
            self._invalidate(rel)

    # -- conditional writes: never assume the server enforces them ------------------------------------------
    def check_commit_support(self) -> None:
        self.check_conditional_writes()

    def check_conditional_writes(self) -> bool:
        """True when the server enforces ``If-None-Match: *`` on ``PutObject`` (probed once, then cached).

        The probe writes ``<root>/.ckptstore-probe-<uuid>`` twice with the condition (the second write must be
        refused with 412) and deletes it. On a server that ignores or rejects the condition this raises
        :class:`~ckptstore.errors.UnsupportedStorageError`, unless ``io.s3_single_writer`` is set: then it
        warns once and returns False (commits fall back to check-then-write).
        """
        enforced = self._conditional
        if enforced is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._probe_conditional_put()
                enforced = self._conditional
        if enforced:
            return True
        if not self.io.s3_single_writer:
            raise _storage_error(UnsupportedStorageError, self._unsupported_message(), errno.EOPNOTSUPP, self.url)
        if not self._warned_single_writer:
            self._warned_single_writer = True
            log.warning(
                "%s; io.s3_single_writer=True: commits under %s check for an existing manifest, then write it — "
                "NOT atomic: only one process may ever write to this root",
                self._limitation(),
                self.url,
            )
        return False

    def _limitation(self) -> str:
        how = "rejects" if self._conditional_reason else "ignores"
        why = f" ({self._conditional_reason})" if self._conditional_reason else ""
        return f"the S3 server at {self.endpoint} {how} 'If-None-Match: *' on PutObject{why}"

    def _unsupported_message(self) -> str:
        return (
            f"{self._limitation()}: a probe object written twice with that condition was "
            f"{'refused' if self._conditional_reason else 'accepted both times'}. ckptstore commits a step with "
            "one conditional PUT of its manifest; on this server two writers of one step would both succeed and "
            "the second manifest would silently replace the first. Use a server that enforces conditional writes "
            f"(AWS S3 does), or — only if exactly one process ever writes to {self.url} — set "
            "io.s3_single_writer=True (IOOptions(s3_single_writer=True), or 'io: {s3_single_writer: true}' in a "
            "config file)"
        )

    def _probe_conditional_put(self) -> bool:
        key = self._key(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        display = self._display(key)
        op = "PutObject(If-None-Match) probe"

        def put() -> Any:
            return self.client.put_object(**self._params("PutObject", Key=key, Body=b"", IfNoneMatch="*"))

        try:
            with contextlib.suppress(FileExistsError):  # an earlier attempt landed and its answer was lost
                self._retry(put, op, display)
            try:
                self._retry(put, op, display)
                enforced = False
            except FileExistsError:
                enforced = True
        except StorageError as e:
            if not is_not_implemented(e):
                raise
            info = s3_error_info(e)
            self._conditional_reason = f"HTTP {info[0]} {info[1]}" if info else "not implemented"
            enforced = False
        finally:
            try:
                self._call("DeleteObject", "delete_object", key, Key=key)
            except Exception as e:
                log.warning("could not delete the probe object %s (gc removes it later): %s", display, e)
        log.debug("%s: conditional writes %s", self.endpoint, "enforced" if enforced else "NOT enforced")
        return enforced

    def _create_single_writer(self, rel: str, key: str, body: memoryview) -> None:
        """``create_exclusive`` on a server without conditional writes (``io.s3_single_writer``): HEAD, then PUT."""
        try:
            self._head(rel)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, "S3 object exists (checked before writing)", self._display(key))
        try:
            self._call("PutObject", "put_object", key, Key=key, Body=body)
        finally:
            self._invalidate(rel)

    def remove_stale_probes(self, older_than_seconds: float = 0.0) -> int:
        """Delete probe objects (:meth:`check_conditional_writes`) left by killed processes; returns how many."""
        prefix = self._key(PROBE_PREFIX)
        now = time.time()
        count = 0
        for resp in self._iter_list(prefix, None):
            for obj in resp.get("Contents") or ():
                modified = obj.get("LastModified")
                ts = modified.timestamp() if hasattr(modified, "timestamp") else 0.0
                if older_than_seconds and ts and now - ts < older_than_seconds:
                    continue
                k = obj["Key"]
                with contextlib.suppress(FileNotFoundError):
                    self._call("DeleteObject", "delete_object", k, Key=k)
                    count += 1
        return count

    def _has_content(self, key: str, body: memoryview) -> bool:
        try:
            resp = self._call("GetObject", "get_object", key, Key=key)
            data = resp["Body"].read()
        except OSError:
            return False
        return bool(data == body)

    # -- reading -----------------------------------------------------------------------------------------
    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        key = self._key(rel)
        if (start is not None and start < 0) or (end is not None and end < 0):
            n = self.size(rel)
            start = None if start is None else (start + n if start < 0 else start)
            end = None if end is None else (end + n if end < 0 else end)
        if start is None and end is None:
            return self._get_all(key)
        begin = start or 0
        if end is None:
            try:
                return self._get_all(key, begin)
            except EOFError:
                if begin >= self.size(rel):
                    return b""
                raise
        want = end - begin
        if want <= 0:
            return b""
        buf = bytearray(want)
        self.read_into(rel, begin, [memoryview(buf)])
        return bytes(buf)

    def _get_all(self, key: str, start: int = 0) -> bytes:
        """The object from ``start`` to its end."""
        params = self._params("GetObject", Key=key, **({"Range": f"bytes={start}-"} if start else {}))

        def get() -> bytes:
            resp = self.client.get_object(**params)
            if start:
                _check_content_range(resp, start, None, self._display(key))
            # StreamingBody.read() checks the body against Content-Length (IncompleteReadError, retried).
            return bytes(resp["Body"].read())

        return self._retry(get, "GetObject", self._display(key))

    def read_into(self, rel: str, offset: int, buffers: Sequence[Buffer]) -> None:
        """Fill ``buffers`` in order from the object bytes at ``offset``: ranged GETs in parallel, no staging copy.

        Raises ``EOFError`` when the object ends before the buffers are full.
        """
        key = self._key(rel)
        views = [v for v in (_byte_view(b) for b in buffers) if v.nbytes]
        if not views:
            return
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        tasks = list(_split_ranges(offset, views, self.io.read_chunk_bytes))
        if len(tasks) == 1:
            self._get_into(key, *tasks[0])
            return
        futures = [self.pool.submit(self._get_into, key, start, vs) for start, vs in tasks[1:]]
        first_error: BaseException | None = None
        try:
            self._get_into(key, *tasks[0])
        except BaseException as e:
            first_error = e
        done, _ = wait_futures(futures, return_when=FIRST_EXCEPTION)
        if first_error is None:
            first_error = next((f.exception() for f in done if f.exception() is not None), None)
        if first_error is not None:
            for f in futures:
                f.cancel()
            wait_futures(futures)  # nobody may write into the caller's buffers after we return
            raise first_error
        for f in futures:
            f.result()

    def _get_into(self, key: str, start: int, views: list[memoryview]) -> None:
        want = sum(v.nbytes for v in views)
        display = self._display(key)
        params = self._params("GetObject", Key=key, Range=f"bytes={start}-{start + want - 1}")

        def get() -> None:
            resp = self.client.get_object(**params)
            body = resp["Body"]
            clean = False
            try:
                _check_content_range(resp, start, want, display)
                got = _readinto(body, views)
                if got < want:
                    raise EOFError(
                        f"short read of {display}: wanted {want} bytes at offset {start}, the body had {got}"
                    )
                clean = True
            finally:
                _finish_body(body, clean)

        self._retry(get, "GetObject", display)

    # -- deleting ----------------------------------------------------------------------------------------
    def remove(self, rel: str) -> None:
        key = self._key(rel)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "cannot remove the storage root as a file", self.url)
        with contextlib.suppress(FileNotFoundError):
            self._call("DeleteObject", "delete_object", key, Key=key)
        self._invalidate(rel)

    def remove_tree(self, rel: str) -> None:
        key = self._key(rel)
        listing = self._iter_list(self._dir_prefix(rel), None)
        keys = [obj["Key"] for resp in listing for obj in resp.get("Contents") or ()]
        if key:
            with contextlib.suppress(FileNotFoundError):
                self._head(rel)
                keys.append(key)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self._call(
                "DeleteObjects",
                "delete_objects",
                batch[0],
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = [e for e in resp.get("Errors") or () if e.get("Code") != "NoSuchKey"]
            if errors:
                first = ", ".join(f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}" for e in errors[:3])
                raise StorageError(f"S3 DeleteObjects under {self.url_of(rel)}: {len(errors)} keys failed ({first})")
        self._invalidate(rel)

    # -- multipart housekeeping --------------------------------------------------------------------------
    def incomplete_uploads(self, rel_prefix: str = "") -> list[tuple[str, str, float]]:
        """``(key, upload_id, initiated_unix_time)`` of the multipart uploads in progress under ``rel_prefix``.

        ``rel_prefix`` names a directory (``"step-1"`` covers ``step-1/…``, not ``step-10/…``) or one file.
        """
        key = self._key(rel_prefix)
        under = f"{key}/" if key else ""
        out: list[tuple[str, str, float]] = []
        markers: dict[str, str] = {}
        while True:
            resp = self._call("ListMultipartUploads", "list_multipart_uploads", key, Prefix=key, **markers)
            for u in resp.get("Uploads") or ():
                if not (u["Key"] == key or u["Key"].startswith(under)):
                    continue
                initiated = u.get("Initiated")
                ts = initiated.timestamp() if hasattr(initiated, "timestamp") else 0.0
                out.append((u["Key"], u["UploadId"], ts))
            if not resp.get("IsTruncated"):
                return out
            markers = {"KeyMarker": resp.get("NextKeyMarker", ""), "UploadIdMarker": resp.get("NextUploadIdMarker", "")}
            if not markers["KeyMarker"] and not markers["UploadIdMarker"]:
                return out

    def abort_incomplete_uploads(self, rel_prefix: str = "", *, older_than_seconds: float = 0.0) -> int:
        """Abort multipart uploads under ``rel_prefix`` (started more than ``older_than_seconds`` ago).

        Returns how many were aborted. Pass ``older_than_seconds`` when writers of other processes may still be
        uploading under the prefix: aborting their upload would make their save fail.

        A server that does not implement ``ListMultipartUploads`` (501 ``NotImplemented``, as s3rver) has
        nothing to list: 0, with a warning once per storage. For the whole root (``rel_prefix=""``) this also
        deletes conditional-write probe objects left by killed processes (older than
        ``PROBE_MIN_AGE_SECONDS``).
        """
        if not _check_rel(rel_prefix):
            # A probe of another process lives for milliseconds; one older than this was left by a killed one.
            self.remove_stale_probes(max(older_than_seconds, PROBE_MIN_AGE_SECONDS))
        if not self._multipart_listing:
            return 0
        try:
            uploads = self.incomplete_uploads(rel_prefix)
        except StorageError as e:
            if not is_not_implemented(e):
                raise
            # s3rver and some other S3-compatible servers do not implement ListMultipartUploads: degrade.
            self._multipart_listing = False
            log.warning(
                "the S3 server at %s does not implement ListMultipartUploads (%s): incomplete multipart uploads "
                "under %s cannot be listed, so they are not aborted; use a bucket lifecycle rule "
                "(AbortIncompleteMultipartUpload) or the server's own tools",
                self.endpoint,
                e,
                self.url,
            )
            return 0
        now = time.time()
        count = 0
        for key, upload_id, started in uploads:
            if older_than_seconds and started and now - started < older_than_seconds:
                continue
            with contextlib.suppress(FileNotFoundError):  # finished or aborted meanwhile
                self._call("AbortMultipartUpload", "abort_multipart_upload", key, Key=key, UploadId=upload_id)
                count += 1
        if count:
            log.info("aborted %d incomplete multipart upload(s) under %s", count, self.url_of(rel_prefix))
        return count

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None and hasattr(client, "close"):
            with contextlib.suppress(Exception):
                client.close()
        self._buffers.clear()


class _S3Writer:
    """Upload of one object; see :meth:`S3Storage.open_write`.

    Default mode: parts that lie inside one caller buffer are sent straight from it and ``write`` waits for them
    before it returns (the caller may reuse its memory afterwards); the rest is copied into pooled part buffers
    and uploads while the caller goes on.

    Borrow mode (``borrow=True``: the caller keeps its buffers unchanged until ``close`` returns): nothing is
    copied. Buffers are held until they add up to more than ``io.single_put_bytes``; an object that never gets
    there is one ``PutObject`` at ``close``, a bigger one a multipart upload whose parts are runs of the
    caller's buffers, sent while the caller goes on. Serializers writing a header and then tensor memory get
    zero-copy uploads this way even though their parts straddle buffer boundaries.

    Any failure aborts the multipart upload.
    """

    def __init__(self, st: S3Storage, rel: str, key: str, *, borrow: bool = False) -> None:
        self._st = st
        self._rel = rel
        self._key = key
        self._part = st.io.part_bytes
        self._borrow = borrow
        self._held: list[memoryview] = []  # borrow mode: caller buffers not yet handed to a request
        self._held_bytes = 0
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._futures: list[Future[tuple[int, str]]] = []
        self._size = 0
        self._state = "open"  # open | closed | aborted | failed

    @property
    def display(self) -> str:
        return self._st._display(self._key)

    # -- public ------------------------------------------------------------------------------------------
    def write(self, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        if self._borrow:
            try:
                self._raise_part_error()
                for b in buffers:
                    mv = _byte_view(b)
                    if mv.nbytes:
                        self._held.append(mv)
                        self._held_bytes += mv.nbytes
                if self._upload_id is not None or self._held_bytes > self._st.io.single_put_bytes:
                    self._submit_held(final=False)
            except BaseException:
                self._fail()
                raise
            return
        borrowed: list[Future[tuple[int, str]]] = []
        try:
            self._raise_part_error()
            for b in buffers:
                mv = _byte_view(b)
                while mv.nbytes:
                    if self._fill == 0 and mv.nbytes >= self._part:
                        borrowed.append(self._submit(mv[: self._part], None))
                        mv = mv[self._part :]
                        continue
                    if self._buf is None:
                        self._st._budget.acquire(self._part)
                        self._buf = self._st._buffers.get()
                    n = min(self._part - self._fill, mv.nbytes)
                    self._buf[self._fill : self._fill + n] = mv[:n]
                    self._fill += n
                    mv = mv[n:]
                    if self._fill == self._part:
                        self._submit_staged()
            # The caller's memory must not be read after write() returns.
            if borrowed:
                wait_futures(borrowed)
                for f in borrowed:
                    f.result()
        except BaseException:
            self._fail()
            raise

    def close(self) -> None:
        if self._state == "closed":
            return
        self._check_open()
        try:
            self._raise_part_error()
            if self._borrow and self._upload_id is None:
                held, self._held, self._held_bytes = self._held, [], 0
                self._size = sum(v.nbytes for v in held)
                self._st._call_with_body("PutObject", "put_object", self._key, held, Key=self._key)
            elif self._borrow:
                self._submit_held(final=True)
                self._complete(self._collect())
            elif self._upload_id is None:
                body = memoryview(self._buf)[: self._fill] if self._buf is not None else memoryview(b"")
                self._st._call("PutObject", "put_object", self._key, Key=self._key, Body=body)
                self._drop_buffer()
            else:
                if self._fill:
                    self._submit_staged()
                parts = self._collect()
                self._complete(parts)
        except BaseException:
            self._fail()
            raise
        self._state = "closed"
        self._st._invalidate(self._rel)
        log.debug("wrote %s (%d bytes, %d parts)", self.display, self._size, self._next_part - 1)

    def abort(self) -> None:
        if self._state in ("closed", "aborted", "failed"):
            return
        self._fail()
        self._state = "aborted"

    # -- internals ---------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"writer of {self.display} is {self._state}")

    def _raise_part_error(self) -> None:
        # Stop feeding an upload as soon as one of its parts failed for good.
        for f in self._futures:
            if f.done() and not f.cancelled():
                exc = f.exception()
                if exc is not None:
                    raise exc

    def _start(self) -> None:
        resp = self._st._call("CreateMultipartUpload", "create_multipart_upload", self._key, Key=self._key)
        self._upload_id = resp["UploadId"]
        log.debug("multipart upload of %s started (%s)", self.display, self._upload_id)

    def _submit_held(self, *, final: bool) -> None:
        """Borrow mode: hand full parts (the rest too when ``final``) of the held buffers to the upload pool."""
        keep = 0 if final else self._held_bytes % self._part
        groups = [vs for _, vs in _split_ranges(0, self._held, self._part)]
        self._held, self._held_bytes = (groups.pop() if keep else []), keep
        for views in groups:
            self._submit_views(views)

    def _submit_views(self, views: list[memoryview]) -> None:
        if self._upload_id is None:
            self._start()
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(f"{self.display}: more than {MAX_PARTS} parts; raise io.part_bytes (now {self._part})")
        self._next_part += 1
        self._size += sum(v.nbytes for v in views)
        # No staging memory is held, so the budget is not involved: the pool's queue only holds views.
        self._futures.append(self._st.pool.submit(self._upload_part, number, views))

    def _submit_staged(self) -> None:
        buf, fill = self._buf, self._fill
        assert buf is not None
        self._buf, self._fill = None, 0
        self._submit(memoryview(buf)[:fill], buf)

    def _submit(self, view: memoryview, staged: bytearray | None) -> Future[tuple[int, str]]:
        st = self._st
        if self._upload_id is None:
            try:
                self._start()
            except BaseException:
                if staged is not None:
                    self._release(staged)
                raise
        number = self._next_part
        if number > MAX_PARTS:
            if staged is not None:
                self._release(staged)
            raise StorageError(f"{self.display}: more than {MAX_PARTS} parts; raise io.part_bytes (now {self._part})")
        self._next_part += 1
        self._size += view.nbytes
        if staged is None:
            st._budget.acquire(self._part)
        st._budget.start_part()
        try:
            fut = st.pool.submit(self._upload_part, number, view)
        except BaseException:
            st._budget.end_part(self._part)
            if staged is not None:
                st._buffers.put(staged)
            raise

        def done(_: Future[tuple[int, str]]) -> None:
            if staged is not None:
                st._buffers.put(staged)
            st._budget.end_part(self._part)

        fut.add_done_callback(done)
        self._futures.append(fut)
        return fut

    def _upload_part(self, number: int, body: memoryview | list[memoryview]) -> tuple[int, str]:
        assert self._upload_id is not None
        views = body if isinstance(body, list) else [body]
        resp = self._st._call_with_body(
            "UploadPart", "upload_part", self._key, views, Key=self._key, UploadId=self._upload_id, PartNumber=number
        )
        return number, str(resp["ETag"])

    def _collect(self) -> list[dict[str, Any]]:
        wait_futures(self._futures, return_when=FIRST_EXCEPTION)
        results = [f.result() for f in self._futures]
        return [{"PartNumber": n, "ETag": etag} for n, etag in sorted(results)]

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        st = self._st
        assert self._upload_id is not None
        params = st._params(
            "CompleteMultipartUpload", Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
        )
        attempts = 0

        def complete() -> Any:
            nonlocal attempts
            attempts += 1
            return st.client.complete_multipart_upload(**params)

        try:
            st._retry(complete, "CompleteMultipartUpload", self.display)
        except FileNotFoundError:
            # NoSuchUpload after a retry: the first attempt completed and its answer was lost.
            if attempts > 1 and self._object_size() == self._size:
                self._upload_id = None
                return
            raise
        self._upload_id = None

    def _object_size(self) -> int | None:
        try:
            return int(self._st._call("HeadObject", "head_object", self._key, Key=self._key)["ContentLength"])
        except OSError:
            return None

    def _release(self, buf: bytearray) -> None:
        self._st._buffers.put(buf)
        self._st._budget.release(self._part)

    def _drop_buffer(self) -> None:
        if self._buf is not None:
            buf, self._buf, self._fill = self._buf, None, 0
            self._release(buf)

    def _fail(self) -> None:
        """Stop, wait for parts in flight, abort the multipart upload. Never raises."""
        if self._state != "open":
            return
        self._state = "failed"
        self._held, self._held_bytes = [], 0
        for f in self._futures:
            f.cancel()
        wait_futures(self._futures)  # an abort racing in-flight parts could leave them stored
        self._drop_buffer()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        st = self._st
        if not st._multipart_abort:
            return  # the server said it cannot (and warned once)
        try:
            with contextlib.suppress(FileNotFoundError):
                st._call("AbortMultipartUpload", "abort_multipart_upload", self._key, Key=self._key, UploadId=upload_id)
            log.debug("aborted multipart upload of %s (%s)", self.display, upload_id)
        except Exception as e:
            if is_not_implemented(e):
                st._multipart_abort = False
                log.warning(
                    "the S3 server at %s does not implement AbortMultipartUpload (%s): the parts of failed uploads "
                    "under %s stay on the server; use a bucket lifecycle rule or the server's own tools",
                    st.endpoint,
                    e,
                    st.url,
                )
                return
            log.warning(
                "could not abort multipart upload %s of %s (abort_incomplete_uploads will): %s",
                upload_id,
                self.display,
                e,
            )


class _ViewsBody(io.RawIOBase):
    """A seekable, sized request body over several buffers; ``read`` returns slices of them, never copies.

    http.client sends a file-like body by ``read(blocksize)`` + ``sendall`` (a memoryview is fine there), and
    botocore sizes it with ``len``/``seek``/``tell`` and rewinds it with ``seek``.
    """

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__()
        self._views = views
        self._starts: list[int] = []
        pos = 0
        for v in views:
            self._starts.append(pos)
            pos += v.nbytes
        self._len = pos
        self._pos = 0
        self._i = 0  # index of the view holding self._pos

    def __len__(self) -> int:
        return self._len

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self._len
        if not 0 <= pos <= self._len:
            raise ValueError(f"seek to {pos} outside a body of {self._len} bytes")
        self._pos = pos
        self._i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        return pos

    def read(self, size: int | None = -1) -> bytes | memoryview:  # type: ignore[override]
        if size is None or size < 0:
            rest = [self.read(self._len)]
            while rest[-1]:
                rest.append(self.read(self._len))
            return b"".join(rest)
        while self._i < len(self._views):
            v = self._views[self._i]
            off = self._pos - self._starts[self._i]
            if off < v.nbytes:
                take = min(size, v.nbytes - off)
                self._pos += take
                return v[off : off + take]
            self._i += 1
        return b""

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        n = len(data)
        b[:n] = data
        return n


# -- helpers -----------------------------------------------------------------------------------------------
def _split_ranges(offset: int, views: list[memoryview], chunk: int) -> Iterator[tuple[int, list[memoryview]]]:
    """Cut the destination into GET ranges of at most ``chunk`` bytes: ``(object_offset, [dest views])``."""
    pos = offset
    cur: list[memoryview] = []
    cur_start = offset
    cur_n = 0
    for v in views:
        while v.nbytes:
            n = min(chunk - cur_n, v.nbytes)
            cur.append(v[:n])
            v = v[n:]
            cur_n += n
            pos += n
            if cur_n == chunk:
                yield cur_start, cur
                cur, cur_start, cur_n = [], pos, 0
    if cur:
        yield cur_start, cur


def _check_content_range(resp: dict[str, Any], start: int, want: int | None, display: str) -> None:
    length = resp.get("ContentLength")
    if want is not None and length is not None and int(length) < want:
        raise EOFError(f"short read of {display}: wanted {want} bytes at offset {start}, the body has {length}")
    cr = resp.get("ContentRange")
    if not cr:
        if start != 0:
            raise StorageError(f"S3 GetObject of {display}: the server ignored the Range header (offset {start})")
        return
    try:
        spec = cr.split()[1] if " " in cr else cr
        rng, _, _total = spec.partition("/")
        first_s, _, last_s = rng.partition("-")
        first, last = int(first_s), int(last_s)
    except (ValueError, IndexError):
        raise StorageError(f"S3 GetObject of {display}: unparsable Content-Range {cr!r}") from None
    if first != start:
        raise StorageError(f"S3 GetObject of {display}: asked for offset {start}, got Content-Range {cr!r}")
    if want is not None and last - first + 1 < want:
        raise EOFError(
            f"short read of {display}: wanted {want} bytes at offset {start}, object ends at byte {last + 1}"
        )


def _readinto(body: Any, views: list[memoryview]) -> int:
    """Read the response body into ``views`` in order; returns the bytes read (less than asked = body ended)."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    readinto: Callable[[memoryview], int] | None = getattr(fp, "readinto", None)
    if readinto is None or getattr(raw, "_has_decoded_content", False):
        readinto = _fallback_reader(body)
    total = 0
    for v in views:
        pos = 0
        while pos < v.nbytes:
            n = readinto(v[pos:])
            if not n:
                remaining = getattr(fp, "length", None)
                if isinstance(remaining, int) and remaining > 0:
                    # The connection ended before Content-Length was reached: transient, the range is retried.
                    raise http.client.IncompleteRead(b"", remaining)
                return total + pos
            pos += n
        total += pos
    return total


def _fallback_reader(body: Any) -> Callable[[memoryview], int]:
    def readinto(dest: memoryview) -> int:
        data = body.read(min(dest.nbytes, _FALLBACK_READ))
        dest[: len(data)] = data
        return len(data)

    return readinto


def _finish_body(body: Any, clean: bool) -> None:
    # http.client's readinto bypasses urllib3's bookkeeping; a fully read response may go back to the pool,
    # anything else must close its connection (unread bytes would corrupt the next response on it).
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if clean and fp is not None and (getattr(fp, "length", None) == 0 or fp.isclosed()):
        with contextlib.suppress(Exception):
            raw.release_conn()
            return
    with contextlib.suppress(Exception):
        body.close()


def _make_client(fs: Any, max_connections: int) -> Any:
    """A thread-safe botocore S3 client with the credentials, endpoint and options the s3fs ``fs`` uses."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    prepare = getattr(fs, "_prepare_config_kwargs", None)
    config_kwargs: dict[str, Any] = dict(prepare() if callable(prepare) else getattr(fs, "config_kwargs", {}))
    for aiohttp_only in ("connector_args", "http_session_cls"):
        config_kwargs.pop(aiohttp_only, None)
    if config_kwargs.get("retries"):
        log.debug("config_kwargs['retries'] is ignored by ckptstore's data path: it retries on its own")
    config_kwargs["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    config_kwargs["max_pool_connections"] = max(int(config_kwargs.get("max_pool_connections", 10)), max_connections)
    config_kwargs.setdefault("request_checksum_calculation", "when_required")
    config_kwargs.setdefault("response_checksum_validation", "when_required")
    s3_cfg = dict(config_kwargs.get("s3") or {})
    s3_cfg.setdefault("payload_signing_enabled", False)
    config_kwargs["s3"] = s3_cfg
    # Parts are memoryviews into tensor memory; botocore's validator only admits bytes/bytearray/file objects.
    config_kwargs["parameter_validation"] = False
    client_kwargs: dict[str, Any] = dict(getattr(fs, "client_kwargs", {}) or {})
    init_kwargs: dict[str, Any] = {
        "aws_access_key_id": getattr(fs, "key", None),
        "aws_secret_access_key": getattr(fs, "secret", None),
        "aws_session_token": getattr(fs, "token", None),
        "endpoint_url": getattr(fs, "endpoint_url", None),
    }
    init_kwargs = {k: v for k, v in init_kwargs.items() if v is not None and k not in client_kwargs}
    if "use_ssl" not in client_kwargs:
        init_kwargs["use_ssl"] = getattr(fs, "use_ssl", True)
    if getattr(fs, "anon", False):
        config_kwargs["signature_version"] = UNSIGNED
        for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            init_kwargs.pop(k, None)
            client_kwargs.pop(k, None)
    session_kwargs = dict(getattr(fs, "kwargs", {}) or {})
    profile = session_kwargs.pop("profile", None)
    if session_kwargs:
        log.debug("s3fs session options not used by the data path: %s", sorted(session_kwargs))
    # Sessions are shared so the S3 service model (a large JSON file) is parsed once per process, not per
    # storage; botocore sessions are not thread-safe, hence the lock around create_client.
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(profile)
        if session is None:
            session = _SESSIONS[profile] = botocore.session.Session(profile=profile)
        client = session.create_client("s3", config=Config(**config_kwargs), **init_kwargs, **client_kwargs)
    _track_connections(client)
    return client


_SESSIONS: dict[str | None, Any] = {}
_SESSIONS_LOCK = threading.Lock()
_TRACKED_POOLS: dict[str, type] = {}
_UNTRACKED_WARNED: list[bool] = []


def _tracked_pool_classes() -> dict[str, type]:
    """botocore's connection pools, with connections that tie themselves to the request deadline of the attempt
    sending on them (``retry.attach_connection``), so the deadline watchdog can shut them down."""
    with _SESSIONS_LOCK:
        if _TRACKED_POOLS:
            return _TRACKED_POOLS
        from botocore.awsrequest import (
            AWSHTTPConnection,
            AWSHTTPConnectionPool,
            AWSHTTPSConnection,
            AWSHTTPSConnectionPool,
        )

        class _TrackedHTTPConnection(AWSHTTPConnection):  # type: ignore[misc]
            def request(self, *args: Any, **kwargs: Any) -> Any:
                attach_connection(self)
                return super().request(*args, **kwargs)

        class _TrackedHTTPSConnection(AWSHTTPSConnection):  # type: ignore[misc]
            def request(self, *args: Any, **kwargs: Any) -> Any:
                attach_connection(self)
                return super().request(*args, **kwargs)

        class _TrackedHTTPConnectionPool(AWSHTTPConnectionPool):  # type: ignore[misc]
            ConnectionCls = _TrackedHTTPConnection

        class _TrackedHTTPSConnectionPool(AWSHTTPSConnectionPool):  # type: ignore[misc]
            ConnectionCls = _TrackedHTTPSConnection

        _TRACKED_POOLS.update(http=_TrackedHTTPConnectionPool, https=_TrackedHTTPSConnectionPool)
        return _TRACKED_POOLS


def _track_connections(client: Any) -> bool:
    """Make the client's connections enforce ``io.request_deadline_seconds`` (False if botocore changed)."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    classes = getattr(session, "_pool_classes_by_scheme", None)
    manager = getattr(session, "_manager", None)
    if not isinstance(classes, dict) or not {"http", "https"} <= set(classes) or manager is None:
        if not _UNTRACKED_WARNED:
            _UNTRACKED_WARNED.append(True)
            log.warning(
                "this botocore version (%s) has an unknown HTTP session layout: io.request_deadline_seconds is "
                "only enforced by socket timeouts, not across a slowly trickling body",
                getattr(importlib.import_module("botocore"), "__version__", "?"),
            )
        return False
    classes.update(_tracked_pool_classes())
    manager.pool_classes_by_scheme = classes  # pools are created on first use: every one is tracked
    return True


__all__ = ["S3Storage"]
