"""The retry wrapper on its own: what is transient, how often it tries, what it raises."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from ckptstore.errors import StorageError
from ckptstore.storage.retry import RetryPolicy, is_transient


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} happened"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


class _Flaky:
    def __init__(self, errors: list[BaseException], result: Any = "ok") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def policy(sleeps: list[float]) -> RetryPolicy:
    return RetryPolicy(attempts=5, base_delay=0.1, max_delay=0.3, sleep=sleeps.append)


@pytest.mark.parametrize(
    "exc",
    [
        _client_error(503, "SlowDown"),
        _client_error(500, "InternalError"),
        _client_error(502, "BadGateway"),
        _client_error(504, "GatewayTimeout"),
        _client_error(400, "RequestTimeout"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionAbortedError(errno.ECONNABORTED, "aborted"),
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        TimeoutError("timed out"),
    ],
)
def test_transient_errors_are_retried(policy: RetryPolicy, sleeps: list[float], exc: BaseException) -> None:
    assert is_transient(exc)
    fn = _Flaky([exc, exc, exc])
    assert policy.call(fn, op="PutObject", key="s3://b/k") == "ok"
    assert fn.calls == 4
    assert len(sleeps) == 3


def test_aiohttp_errors_are_transient() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    assert is_transient(aiohttp.ClientPayloadError("cut"))
    assert is_transient(aiohttp.ServerDisconnectedError())


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error(404, "NoSuchKey"), FileNotFoundError),
        (_client_error(404, "NoSuchBucket"), StorageError),
        (_client_error(403, "AccessDenied"), PermissionError),
        (_client_error(403, "SignatureDoesNotMatch"), PermissionError),
        (_client_error(412, "PreconditionFailed"), FileExistsError),
        (_client_error(416, "InvalidRange"), EOFError),
        (_client_error(400, "InvalidArgument"), StorageError),
        (EOFError("short"), EOFError),
        (ValueError("bug"), ValueError),
    ],
)
def test_definite_errors_pass_at_once(
    policy: RetryPolicy, sleeps: list[float], exc: BaseException, expected: type[BaseException]
) -> None:
    fn = _Flaky([exc])
    with pytest.raises(expected) as ei:
        policy.call(fn, op="GetObject", key="s3://b/k")
    assert fn.calls == 1 and sleeps == []
    if isinstance(ei.value, OSError) and not isinstance(ei.value, StorageError):
        assert ei.value.filename == "s3://b/k"


def test_exhaustion_raises_storage_error(policy: RetryPolicy, sleeps: list[float]) -> None:
    fn = _Flaky([_client_error(500, "InternalError")] * 10)
    with pytest.raises(StorageError) as ei:
        policy.call(fn, op="UploadPart", key="s3://b/step-1/shard.bin")
    assert fn.calls == 5
    msg = str(ei.value)
    assert "UploadPart" in msg and "s3://b/step-1/shard.bin" in msg and "InternalError" in msg and "5 attempts" in msg
    assert isinstance(ei.value.__cause__, ClientError)
    # Exponential with jitter, capped: 0.1, 0.2, 0.3, 0.3 scaled by [0.5, 1).
    caps = [0.1, 0.2, 0.3, 0.3]
    assert len(sleeps) == 4
    assert all(c / 2 <= s < c for s, c in zip(sleeps, caps))


def test_on_retry_hook_and_single_attempt(sleeps: list[float]) -> None:
    seen: list[int] = []
    fn = _Flaky([ConnectionResetError(), ConnectionResetError()])
    policy = RetryPolicy(attempts=3, base_delay=0.0, sleep=sleeps.append)
    assert policy.call(fn, op="GetObject", key="k", on_retry=lambda e, n: seen.append(n)) == "ok"
    assert seen == [1, 2]
    with pytest.raises(StorageError):
        RetryPolicy(attempts=1).call(_Flaky([ConnectionResetError()]), op="GetObject", key="k")
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
