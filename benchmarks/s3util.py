"""S3 helpers of the benchmark harness: the moto endpoint's options, an HTTP request counter, raw s3fs I/O.

* :func:`storage_options` - s3fs options for a moto endpoint (fake credentials passed explicitly, so nothing
  depends on the environment of the fork server the measuring processes come from);
* :class:`RequestCounter` - counts every HTTP request (each attempt, retries included) that botocore or
  aiobotocore sends, by S3 operation, through the ``before-send`` event of every session created in the process
  (ckptstore's botocore client, s3fs's aiobotocore client used by the raw and DCP contenders alike);
* :func:`raw_put` / :func:`raw_get` - the "raw parallel s3fs" contender: one object per tensor, all sent with
  one ``fs.pipe`` / ``fs.cat`` call (s3fs runs them concurrently), as in ``benchmarks/bench_s3.py``.

Run the suite with ``python -m benchmarks.run --target s3``.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

BUCKET = "ckptstore-bench"
REGION = "us-east-1"


def storage_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for the moto server at ``endpoint`` (what ckptstore, DCP's fsspec writer and s3fs get)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }


def botocore_client(options: dict[str, Any]) -> Any:
    """A plain synchronous botocore client for the runner's own housekeeping (bucket, listing, deletes)."""
    import botocore.session

    ck = options.get("client_kwargs", {})
    return botocore.session.Session().create_client(
        "s3",
        endpoint_url=ck.get("endpoint_url"),
        region_name=ck.get("region_name", REGION),
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
    )


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


class RequestCounter:
    """HTTP requests sent to S3 by this process, by operation (``PutObject``, ``UploadPart``, ``GetObject``...).

    :meth:`install` makes every botocore/aiobotocore session created afterwards register :meth:`_on_send` for
    ``before-send.s3``: botocore emits that event once per HTTP attempt, just before sending, in both the
    synchronous client (ckptstore's data path) and the asyncio one (s3fs). Sessions created before
    :meth:`install` are not counted, so install it before the first S3 call of the process.
    """

    _installed: RequestCounter | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_op: collections.Counter[str] = collections.Counter()

    @classmethod
    def install(cls) -> RequestCounter:
        """The process-wide counter (installed on first call; idempotent, inherited by forked children)."""
        if cls._installed is not None:
            return cls._installed
        import botocore.session

        counter = cls()
        orig_init = botocore.session.Session.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            orig_init(self, *args, **kwargs)
            self.register("before-send.s3", counter._on_send)

        # aiobotocore's AioSession calls this __init__ through super(), so both kinds of sessions are covered.
        botocore.session.Session.__init__ = init  # type: ignore[method-assign]
        cls._installed = counter
        return counter

    def _on_send(self, event_name: str = "", **_: Any) -> None:
        # Returning None lets botocore send the request; anything else would replace the response.
        op = event_name.rsplit(".", 1)[-1] if event_name.count(".") >= 2 else "?"
        with self._lock:
            self._by_op[op] += 1

    def reset(self) -> None:
        with self._lock:
            self._by_op.clear()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_op)


def fs_for(options: dict[str, Any] | None) -> Any:
    """The s3fs filesystem for ``options`` (fsspec caches instances, so DCP's reader/writer share it)."""
    import fsspec

    return fsspec.filesystem("s3", **(options or {}))


def raw_put(options: dict[str, Any] | None, blobs: dict[str, bytes]) -> None:
    """Upload ``{url: bytes}`` with one ``fs.pipe`` call: s3fs sends the objects concurrently."""
    fs_for(options).pipe(blobs)


def raw_get(options: dict[str, Any] | None, urls: list[str]) -> dict[str, bytes]:
    """Download ``urls`` with one ``fs.cat`` call (concurrent GETs); ``{url: bytes}`` in the order given."""
    out = fs_for(options).cat(urls)
    # s3fs keys the result by path without the protocol; map back to what the caller asked for.
    by_path = {k.split("://", 1)[-1]: v for k, v in out.items()}
    return {u: by_path[u.split("://", 1)[-1]] for u in urls}


__all__ = ["BUCKET", "RequestCounter", "botocore_client", "fs_for", "raw_get", "raw_put", "split_url"]
