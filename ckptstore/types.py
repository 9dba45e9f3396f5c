"""Small value types shared by every layer (no I/O, no torch.distributed)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What is known about one committed step, read from its manifest.

    Example::

        info = mgr.latest()
        print(info.step, info.epoch, info.metrics.get("loss"), info.nbytes)
    """

    step: int
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    """Unix time (seconds) at which the save started, taken on rank 0."""
    nbytes: int = 0
    """Tensor bytes stored for this step (headers excluded)."""
    world_size: int = 1
    url: str = ""
    """Location of the step's prefix."""
    tier: str = "primary"
    """``"primary"`` or ``"mirror"`` for tiered managers."""
    generation: int = 1
    """Which save of this step number this is: 1, or 2, 3, ... when a run that resumed from an older step saved
    the number again (see ``ckptstore.layout``)."""
    parent: tuple[int, int] | None = None
    """(step, generation) the run was continuing from when it saved this step; None if unknown."""
    verified: bool | None = None
    """True once this manager read every byte of it and the checksums matched (a restore or load); None when
    not checked in this process. Steps that fail verification are quarantined and not listed."""
    quarantined: str | None = None
    """Why this generation is out of service (failed verification, superseded by a resumed run), or None.
    Only ``history(include_quarantined=True)`` lists such steps."""
    missing_per_rank: tuple[str, ...] = ()
    """``restore(strict=False)`` only: paths of ``PerRank`` values this rank has no saved value for (the step was
    saved at another world size); they were left unchanged. With ``strict=True`` that is a StateMismatchError."""

    @property
    def created(self) -> _dt.datetime:
        """``created_at`` as an aware UTC datetime."""
        return _dt.datetime.fromtimestamp(self.created_at, tz=_dt.timezone.utc)

    def metric(self, name: str) -> float | None:
        """The metric's value as float, or None when the step has no such (numeric) metric. An int too large for a
        float (``10**400``) comes back as ``inf``; rank steps with :func:`ckptstore.retention.rank_by_metric`."""
        value = self.metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            return float(value)
        except OverflowError:
            return float("inf") if value > 0 else float("-inf")


@dataclass(frozen=True, kw_only=True)
class SaveResult:
    """Returned by a completed save.

    Example::

        res = mgr.save(10, {"model": model})
        print(f"{res.nbytes / 2**20:.1f} MiB in {res.seconds:.2f}s -> {res.url}")
    """

    step: int
    url: str
    nbytes: int
    files: int
    seconds: float
    blocking_seconds: float = 0.0
    """Time the caller was blocked (equals ``seconds`` for a synchronous save). With ``overlap_staging`` it
    includes ``staging_wait_seconds``."""
    staging_wait_seconds: float = 0.0
    """``overlap_staging``: how long optimizer steps and module forwards waited for the staging copy."""
    deleted_steps: tuple[int, ...] = ()
    """Steps removed by the retention policy after this commit."""
