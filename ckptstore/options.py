"""Tuning knobs, all in one place (frozen, keyword-only)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class IOOptions:
    """How ckptstore moves bytes. The defaults suit local NVMe and S3 alike.

    Example::

        mgr = CheckpointManager("/ckpt", io=IOOptions(threads=8, part_bytes=64 * MiB))
    """

    threads: int = 4
    """Files written / ranges read in parallel per process (threads release the GIL during I/O)."""
    file_bytes: int = 512 * MiB
    """Target size of one shard file; a rank's data is spread over ``ceil(bytes / file_bytes)`` files,
    at least ``min(threads, #tensors)`` when the data is larger than ``min_split_bytes``."""
    chunk_bytes: int = 64 * MiB
    """Tensors larger than this are split (along dim 0) into chunks that different ranks/files write."""
    min_split_bytes: int = 64 * MiB
    """Below this much data per rank a single shard file is written (small saves stay one file)."""
    read_chunk_bytes: int = 32 * MiB
    """Largest single read request; bigger tensors are read as several parallel ranges."""
    part_bytes: int = 32 * MiB
    """S3 multipart part size (16-64 MiB recommended)."""
    single_put_bytes: int = 128 * MiB
    """S3: shard files up to this size are uploaded with one ``PutObject`` instead of a multipart upload
    (fewer requests; no server-side reassembly). Bigger files go multipart, in parallel parts. On S3, shard
    files are planned at most half this size (overriding a larger ``file_bytes``), so they stay single PUTs."""
    max_inflight_bytes: int = 256 * MiB
    """Upper bound of buffered-but-not-yet-uploaded bytes per process (S3)."""
    verify: bool = True
    """Check crc32c of every piece on restore/load."""
    mmap_load: bool = True
    """``load()`` from local disk: tensors map the shard files copy-on-write (as ``torch.load(mmap=True)`` and
    safetensors do) instead of being read into freshly allocated memory, which is several times slower to
    touch first. Writes to such a tensor stay private; the files are never changed."""
    timeout_seconds: float = 600.0
    """Distributed collectives and waits give up after this long (no rank hangs forever)."""
    background_nice: int = 10
    """Async saves: the niceness (0-19, Linux) of the background threads that write, so the training
    threads keep their CPU while a save is in flight. 0 leaves them at the caller's priority."""
    staging_budget_bytes: int | None = None
    """Most host memory async saves may hold in staging buffers (None: as much as the state needs). A state
    larger than the budget is saved synchronously, with a warning."""
    request_deadline_seconds: float = 300.0
    """S3: the most time one request may take, its retries and the whole request and response bodies included
    (a ranged GET of ``read_chunk_bytes``, a part or single PUT of up to ``single_put_bytes``). A server that
    answers, or reads, a byte every few seconds never trips a socket timeout; this deadline cuts it off: the
    connection is closed and the request fails with ``StorageError`` (errno ``ETIMEDOUT``), not retried. Raise
    it for very large parts over slow links (the default allows ~0.45 MB/s for a 128 MiB PUT)."""
    verify_replicas: str = "sample"
    """Distributed saves: check that a tensor every rank holds whole (a DDP replica) has the same value on every
    rank, since only one copy is written. ``"sample"``: crc32c of the whole tensor up to 64 KiB, else of 8 spread
    4 KiB blocks (cheap; catches a desynchronised replica, a rank-local counter or EMA, a per-rank optimizer
    shard); ``"full"``: crc32c of every byte; ``"off"``. A mismatch fails the save with ``DistributedSaveError``
    naming the key and the ranks: wrap per-rank values in ``PerRank`` or shard them as DTensors."""
    read_once: bool = True
    """Distributed restores: a piece every rank reads whole (DDP replicas, FSDP2's unsharded buffers) is read from
    storage by one rank (owners balanced by bytes), checked there, and sent to the others over the checkpoint
    process group, so a job reads each byte once whatever its world size. Pieces only some ranks need are read
    by those ranks. A failed owner read falls back to direct reads with a warning. ``False``: every rank reads
    everything it restores itself."""
    s3_single_writer: bool = False
    """S3: allow a server that ignores ``If-None-Match: *`` on ``PutObject`` (s3rver and other S3-compatible
    servers; AWS S3 and moto enforce it). The commit of a step relies on that condition: without it, two
    writers of one step both succeed and the second manifest silently replaces the first. ckptstore checks the
    server once per storage (a probe object, written twice, then deleted) and refuses to commit on such a server
    with ``UnsupportedStorageError``, unless this is true. Set it only when ONE process ever writes to this root:
    commits then check for an existing manifest before they write (not atomic), with a warning."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "staging_budget_bytes" and v is None:
                continue
            if f.name == "background_nice":
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 19:
                    raise ConfigError(f"io.background_nice must be an int from 0 to 19, got {v!r}")
                continue
            if f.name == "verify_replicas":
                if v not in ("sample", "full", "off"):
                    raise ConfigError(f"io.verify_replicas must be 'sample', 'full' or 'off', got {v!r}")
                continue
            if f.name in ("verify", "mmap_load", "s3_single_writer", "read_once"):
                if not isinstance(v, bool):
                    raise ConfigError(f"io.{f.name} must be true or false, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"io.{f.name} must be a positive number, got {v!r}")
        if self.part_bytes < 5 * MiB:
            raise ConfigError(f"io.part_bytes must be at least 5 MiB (an S3 limit), got {self.part_bytes}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> IOOptions:
        """Build from a plain dict (YAML ``io:`` section); unknown keys raise ``ConfigError``."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(u, names, n=1) for u in unknown]
            msg = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in zip(unknown, hints))
            raise ConfigError(f"unknown io option(s) {msg}; valid: {', '.join(sorted(names))}")
        return cls(**d)
