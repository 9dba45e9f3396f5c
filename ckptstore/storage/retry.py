"""Bounded retries for remote storage calls (S3): one wrapper, one classification of errors.

Every S3 request of :class:`~ckptstore.storage.s3.S3Storage` goes through :meth:`RetryPolicy.call`. The botocore
client it uses has its own retries switched off, so the attempt count here is the real one.

- Transient failures (HTTP 500/502/503/504, ``SlowDown``, ``RequestTimeout``, connection reset/aborted/refused,
  read/connect timeouts, a body cut short by the connection, aiohttp client errors) are retried with exponential
  backoff and jitter, at most ``attempts`` times in all; then :class:`~ckptstore.errors.StorageError` is raised
  naming the operation, the key and the last error.
- Definite answers pass through at once as built-in exceptions: 404 → ``FileNotFoundError``,
  412 → ``FileExistsError``, 416 → ``EOFError``. ``EOFError`` and ``OSError`` subclasses raised by the wrapped
  function itself (e.g. a short body) are not retried either.
- Answers about the configuration, not about one object, become :class:`~ckptstore.errors.StorageError` with the
  errno of their class and a message saying what to check: a missing bucket (``NoSuchBucket``) → errno
  ``ENOENT`` — deliberately *not* a ``FileNotFoundError``, so that a wrong bucket name never looks like an empty
  checkpoint root or a missing object; rejected credentials or permissions (403, ``InvalidAccessKeyId``,
  ``SignatureDoesNotMatch``, ``ExpiredToken``, …) → errno ``EACCES``, also a ``PermissionError``.
- Any other client error (400, 405, …) is not retried and becomes ``StorageError``.
- ``deadline`` (seconds) bounds one request with all its retries, the whole request and response bodies included:
  a server that sends (or reads) one byte every few seconds beats every socket timeout, so a watchdog thread
  shuts the connection down when the deadline passes and the request fails with ``StorageError``
  (errno ``ETIMEDOUT``) — not retried, as the time is spent. No retry starts that could not finish in time.
  Connections are tied to the attempt that uses them by :func:`attach_connection` (called by the S3 client's
  connection class, see ``s3._track_connections``).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import http.client
import importlib
import itertools
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import StorageError

log = logging.getLogger("ckptstore")

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        # AWS answers 409 when two conditional writes of one key overlap; a retry gets the real outcome (412 or 200).
        "ConditionalRequestConflict",
        "XAmzContentSHA256Mismatch",
    }
)

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "NotFound", "404"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
# Answers about who is asking, not about the object: credentials, tokens, signatures, permissions.
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "Forbidden",
        "403",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "AccountProblem",
    }
)
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
# How S3-compatible servers answer an operation or header they do not implement.
_NOT_IMPLEMENTED_CODES = frozenset(
    {"NotImplemented", "XNotImplemented", "UnsupportedOperation", "NotSupported", "MethodNotAllowed"}
)
_NOT_IMPLEMENTED_STATUS = frozenset({501, 405})


class _DeniedStorageError(StorageError, PermissionError):
    """A :class:`StorageError` that is also a ``PermissionError`` (rejected credentials or permissions)."""


# Shown as what it is to the user: a StorageError (also a PermissionError), like the manager's typed errors.
_DeniedStorageError.__name__ = _DeniedStorageError.__qualname__ = "StorageError"
_DeniedStorageError.__module__ = StorageError.__module__


def _transient_exception_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [
        ConnectionError,  # reset, aborted, refused, broken pipe
        TimeoutError,  # socket.timeout is an alias since 3.10
        socket.gaierror,
        http.client.IncompleteRead,
        http.client.RemoteDisconnected,
        http.client.BadStatusLine,
    ]
    names = {
        "botocore.exceptions": (
            "HTTPClientError",  # EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ProxyError…
            "ConnectionError",
            "IncompleteReadError",
            "ResponseStreamingError",
        ),
        # Throttling answers sometimes carry a body botocore cannot parse.
        "botocore.parsers": ("ResponseParserError",),
    }
    for module_name, attrs in names.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - botocore comes with s3fs
            continue
        types += [t for t in (getattr(module, a, None) for a in attrs) if isinstance(t, type)]
    try:
        import urllib3.exceptions as u3

        types += [u3.ProtocolError, u3.TimeoutError, u3.NewConnectionError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_exception_types()


def _storage_error(cls: type[StorageError], message: str, err: int, filename: str | None) -> StorageError:
    e = cls(message)
    e.errno, e.strerror, e.filename = err, os.strerror(err), filename
    return e


def s3_error_info(exc: BaseException | None) -> tuple[int | None, str] | None:
    """``(http_status, error_code)`` of the S3 answer behind ``exc`` (itself or a ``__cause__``), else None."""
    seen = 0
    while exc is not None and seen < 8:
        info = _client_error_info(exc)
        if info is not None:
            return info
        exc, seen = exc.__cause__, seen + 1
    return None


def is_not_implemented(exc: BaseException) -> bool:
    """True when ``exc`` is (or was caused by) a server's "this operation/header is not implemented" answer."""
    info = s3_error_info(exc)
    if info is None:
        return False
    status, code = info
    return code in _NOT_IMPLEMENTED_CODES or status in _NOT_IMPLEMENTED_STATUS


def _client_error_info(exc: BaseException) -> tuple[int | None, str] | None:
    """``(http_status, error_code)`` of a botocore ``ClientError``, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    err = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode")
    code = str(err.get("Code") or "")
    if status is None and code.isdigit():
        status = int(code)
    return (int(status) if status is not None else None), code


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same request may succeed."""
    info = _client_error_info(exc)
    if info is not None:
        status, code = info
        return code in TRANSIENT_CODES or (status in TRANSIENT_STATUS)
    if isinstance(exc, (EOFError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(exc, _TRANSIENT_TYPES)


def _bucket_of(key: str) -> str:
    return key[len("s3://") :].split("/", 1)[0] if key.startswith("s3://") else key.split("/", 1)[0]


def translate(exc: BaseException, op: str, key: str, *, endpoint: str | None = None) -> BaseException | None:
    """The exception a definite (non-transient) S3 answer maps to; None if ``exc`` is no S3 answer.

    ``key`` is the ``s3://bucket/key`` display name; ``endpoint`` (the server's URL, if not AWS's) goes into the
    messages of configuration errors.
    """
    info = _client_error_info(exc)
    if info is None:
        return None
    status, code = info
    at = f" at {endpoint}" if endpoint else ""
    if code in _NO_BUCKET_CODES:
        bucket = _bucket_of(key)
        return _storage_error(
            StorageError,
            f"S3 {op} of {key!r}: bucket {bucket!r} does not exist{at} (NoSuchBucket: {_message(exc)}); check the "
            "bucket name in the URL and the endpoint_url/region in storage_options — ckptstore does not create it",
            errno.ENOENT,
            key,
        )
    if code in _DENIED_CODES or status == 403:
        bucket = _bucket_of(key)
        return _storage_error(
            _DeniedStorageError,
            f"S3 {op} of {key!r}: access denied{at} ({code or status}: {_message(exc)}); check the credentials "
            "(key/secret/token in storage_options, or the AWS_* environment / profile), that they are valid for "
            f"this endpoint, and that they may read and write bucket {bucket!r}",
            errno.EACCES,
            key,
        )
    # The key goes in as the filename of the OSError, so str(e) names it once.
    short = f"S3 {op}: {code or status}: {_message(exc)}"
    if code in _NOT_FOUND_CODES or status == 404:
        return FileNotFoundError(errno.ENOENT, short, key)
    if code in _EXISTS_CODES or status == 412:
        return FileExistsError(errno.EEXIST, short, key)
    msg = f"S3 {op} of {key!r}: {code or status}: {_message(exc)}"
    if code == "InvalidRange" or status == 416:
        return EOFError(msg)
    return StorageError(f"{msg} (not retryable)")


def _message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        m = (response.get("Error") or {}).get("Message")
        if m:
            return str(m)
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in attempts.

    The n-th retry waits ``min(max_delay, base_delay * 2**n)`` scaled by a random factor in [0.5, 1), so a burst
    of clients that failed together does not retry together.

    Example::

        policy = RetryPolicy(attempts=5, base_delay=0.05)
        body = policy.call(lambda: client.get_object(Bucket="b", Key="k"), op="GetObject", key="b/k")
    """

    attempts: int = 5
    """Tries in all (the first one included); at least 1."""
    base_delay: float = 0.05
    """Seconds before the first retry."""
    max_delay: float = 2.0
    """Upper bound of a single wait."""
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay(self, retry_index: int) -> float:
        """Seconds to wait before retry number ``retry_index`` (0-based)."""
        cap = min(self.max_delay, self.base_delay * (2.0**retry_index))
        return cap * (0.5 + random.random() / 2)

    def call(
        self,
        fn: Callable[[], T],
        *,
        op: str,
        key: str,
        on_retry: Callable[[BaseException, int], None] | None = None,
        deadline: float | None = None,
        endpoint: str | None = None,
    ) -> T:
        """Run ``fn`` until it succeeds, fails for good, or ``attempts`` are used up.

        ``on_retry(exc, attempt)`` runs before each retry (e.g. to reset a partially filled buffer).
        ``deadline``: seconds for all attempts together (None: unbounded); see the module docstring.
        ``endpoint`` names the server in the messages of configuration errors.
        """
        expires = time.monotonic() + deadline if deadline is not None and math.isfinite(deadline) else None
        last: BaseException | None = None
        tried = 0
        for attempt in range(1, self.attempts + 1):
            tried = attempt
            token = _DeadlineToken(expires) if expires is not None else None
            try:
                if token is None:
                    return fn()
                with _attempt_deadline(token):
                    return fn()
            except Exception as exc:
                if token is not None and token.fired:
                    assert deadline is not None
                    raise _deadline_error(op, key, deadline, endpoint, attempt, exc) from exc
                if not is_transient(exc):
                    mapped = translate(exc, op, key, endpoint=endpoint)
                    if mapped is None:
                        raise
                    raise mapped from exc
                last = exc
                if attempt == self.attempts:
                    break
                wait = self.delay(attempt - 1)
                if expires is not None and time.monotonic() + wait >= expires:
                    break  # no time left for another attempt
                log.debug(
                    "S3 %s of %r failed (attempt %d/%d), retrying in %.3fs: %s",
                    op,
                    key,
                    attempt,
                    self.attempts,
                    wait,
                    _describe(exc),
                )
                if on_retry is not None:
                    on_retry(exc, attempt)
                self.sleep(wait)
        assert last is not None
        within = f" within the request deadline of {deadline:g} s" if tried < self.attempts else ""
        log.warning("S3 %s of %r failed after %d attempts%s: %s", op, key, tried, within, _describe(last))
        raise StorageError(
            f"S3 {op} of {key!r} failed after {tried} attempts{within}; last error: {_describe(last)}"
        ) from last


def _deadline_error(
    op: str, key: str, deadline: float, endpoint: str | None, attempt: int, exc: BaseException
) -> StorageError:
    at = f"the server at {endpoint}" if endpoint else "the server"
    return _storage_error(
        StorageError,
        f"S3 {op} of {key!r} did not complete within the request deadline of {deadline:g} s "
        f"(io.request_deadline_seconds; attempt {attempt}, connection closed, last error: {_describe(exc)}): "
        f"{at} is stalled or sends/accepts data too slowly. Check the endpoint and the network; raise "
        "io.request_deadline_seconds only for very large requests over slow links",
        errno.ETIMEDOUT,
        key,
    )


# -- request deadlines -------------------------------------------------------------------------------------
class _DeadlineToken:
    """One attempt of a request with a deadline: the connections it used, whether the watchdog fired."""

    __slots__ = ("conns", "done", "expires", "fired", "lock")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.conns: list[Any] = []
        self.fired = False
        self.done = False
        self.lock = threading.Lock()

    def shut(self) -> None:
        """Shut down the sockets of this attempt's connections: blocked reads and writes return at once."""
        with self.lock:
            if self.done:
                return
            self.fired = True
            conns = list(self.conns)
        for conn in conns:
            _shutdown(conn)


def _shutdown(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.shutdown(socket.SHUT_RDWR)


_tls = threading.local()


def attach_connection(conn: Any) -> None:
    """Tie an HTTP connection that is about to send a request to the current attempt's deadline (if any).

    Called by the S3 client's connection class before every request. A connection started after the deadline
    fired is shut down at once.
    """
    token: _DeadlineToken | None = getattr(_tls, "token", None)
    if token is None:
        return
    with token.lock:
        if token.done:
            return
        token.conns.append(conn)
        fired = token.fired
    if fired:
        _shutdown(conn)


class _Watchdog:
    """One daemon thread per process: shuts down the connections of attempts whose deadline passed."""

    RESHUT_SECONDS = 0.25  # a fired attempt still running (e.g. it was connecting) is shut again this often

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _DeadlineToken]] = []
        self._fired: list[_DeadlineToken] = []
        self._seq = itertools.count()
        self._running = False
        self._active = 0

    def add(self, token: _DeadlineToken) -> None:
        with self._cond:
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="ckptstore-s3-deadline", daemon=True).start()
            heapq.heappush(self._heap, (token.expires, next(self._seq), token))
            self._active += 1
            if len(self._heap) > 1024 and len(self._heap) > 4 * self._active:
                self._heap = [e for e in self._heap if not e[2].done]
                heapq.heapify(self._heap)
            self._cond.notify()

    def remove(self, token: _DeadlineToken) -> None:
        with token.lock:
            token.done = True
            token.conns.clear()
        with self._cond:
            self._active -= 1

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                if cond is not self._cond:  # reset in a forked child
                    return
                now = time.monotonic()
                due: list[_DeadlineToken] = []
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    t = heapq.heappop(self._heap)[2]
                    if not t.done:
                        due.append(t)
                self._fired = [t for t in self._fired if not t.done] + due
                todo = list(self._fired)
                if not todo:
                    cond.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for t in todo:
                t.shut()
            time.sleep(self.RESHUT_SECONDS)


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    # The parent's watchdog thread does not exist in a child, and its lock may have been held at the fork.
    os.register_at_fork(after_in_child=_WATCHDOG._reset)


@contextlib.contextmanager
def _attempt_deadline(token: _DeadlineToken) -> Any:
    prev = getattr(_tls, "token", None)
    _tls.token = token
    _WATCHDOG.add(token)
    try:
        yield
    finally:
        _WATCHDOG.remove(token)
        _tls.token = prev


def _describe(exc: BaseException) -> str:
    info = _client_error_info(exc)
    if info is not None:
        status, code = info
        return f"HTTP {status} {code}: {_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def call_with_retry(fn: Callable[[], T], *, op: str, key: str, policy: RetryPolicy | None = None) -> T:
    """Shorthand for ``(policy or RetryPolicy()).call(fn, op=op, key=key)``."""
    return (policy or RetryPolicy()).call(fn, op=op, key=key)


__all__ = [
    "TRANSIENT_CODES",
    "TRANSIENT_STATUS",
    "RetryPolicy",
    "attach_connection",
    "call_with_retry",
    "is_not_implemented",
    "is_transient",
    "s3_error_info",
    "translate",
]
