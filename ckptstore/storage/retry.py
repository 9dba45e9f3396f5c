"""Bounded retries for remote storage calls (S3): one wrapper, one classification of errors.

Every S3 request of :class:`~ckptstore.storage.s3.S3Storage` goes through :meth:`RetryPolicy.call`. The botocore
client it uses has its own retries switched off, so the attempt count here is the real one.

- Transient failures (HTTP 500/502/503/504, ``SlowDown``, ``RequestTimeout``, connection reset/aborted/refused,
  read/connect timeouts, a body cut short by the connection, aiohttp client errors) are retried with exponential
  backoff and jitter, at most ``attempts`` times in all; then :class:`~ckptstore.errors.StorageError` is raised
  naming the operation, the key and the last error.
- Definite answers pass through at once as built-in exceptions: 404 → ``FileNotFoundError``,
  403 → ``PermissionError``, 412 → ``FileExistsError``, 416 → ``EOFError``. ``EOFError`` and ``OSError``
  subclasses raised by the wrapped function itself (e.g. a short body) are not retried either.
- Any other client error (400, 405, …) is not retried and becomes ``StorageError``.
"""

from __future__ import annotations

import errno
import http.client
import importlib
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

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

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "403", "AllAccessDisabled", "InvalidAccessKeyId"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})


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


def translate(exc: BaseException, op: str, key: str) -> BaseException | None:
    """The built-in exception a definite (non-transient) S3 answer maps to; None if ``exc`` is no S3 answer."""
    info = _client_error_info(exc)
    if info is None:
        return None
    status, code = info
    # The key goes in as the filename of the OSError, so str(e) names it once.
    short = f"S3 {op}: {code or status}: {_message(exc)}"
    if code in _NOT_FOUND_CODES or status == 404:
        return FileNotFoundError(errno.ENOENT, short, key)
    if code in _DENIED_CODES or status == 403:
        return PermissionError(errno.EACCES, short, key)
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
    ) -> T:
        """Run ``fn`` until it succeeds, fails for good, or ``attempts`` are used up.

        ``on_retry(exc, attempt)`` runs before each retry (e.g. to reset a partially filled buffer).
        """
        last: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    mapped = translate(exc, op, key)
                    if mapped is None:
                        raise
                    raise mapped from exc
                last = exc
                if attempt == self.attempts:
                    break
                wait = self.delay(attempt - 1)
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
        log.warning("S3 %s of %r failed after %d attempts: %s", op, key, self.attempts, _describe(last))
        raise StorageError(
            f"S3 {op} of {key!r} failed after {self.attempts} attempts; last error: {_describe(last)}"
        ) from last


def _describe(exc: BaseException) -> str:
    info = _client_error_info(exc)
    if info is not None:
        status, code = info
        return f"HTTP {status} {code}: {_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def call_with_retry(fn: Callable[[], T], *, op: str, key: str, policy: RetryPolicy | None = None) -> T:
    """Shorthand for ``(policy or RetryPolicy()).call(fn, op=op, key=key)``."""
    return (policy or RetryPolicy()).call(fn, op=op, key=key)


__all__ = ["TRANSIENT_CODES", "TRANSIENT_STATUS", "RetryPolicy", "call_with_retry", "is_transient", "translate"]
