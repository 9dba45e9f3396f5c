"""Collectives used by the save/restore protocol, over torch.distributed (no home-made transport).

``LocalComm`` is the single-process case. ``TorchComm`` uses a dedicated gloo group (object collectives are
small metadata; a separate group keeps checkpoint traffic from interleaving with the training's own NCCL/gloo
collectives, which matters when a background thread saves) with a bounded timeout, so a dead rank turns into
an error instead of a hang.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

log = logging.getLogger("ckptstore")


class Comm:
    """Single process: rank 0 of 1. Every collective is the identity."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, obj: Any) -> list[Any] | None:
        """Objects of every rank, on rank 0 (None elsewhere)."""
        return [obj]

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object, on every rank."""
        return obj

    def barrier(self) -> None:
        return None


LocalComm = Comm


class TorchComm(Comm):
    """Collectives on an initialised torch.distributed default group (gloo or NCCL)."""

    def __init__(self, timeout_seconds: float = 600.0, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank(group) if group is not None else dist.get_rank()
        self.world_size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        timeout = _dt.timedelta(seconds=timeout_seconds)
        if group is None:
            # All ranks must create the group in the same order: it happens in CheckpointManager.__init__,
            # which every rank calls.
            group = dist.new_group(backend="gloo", timeout=timeout)
        self.group = group
        self.timeout = timeout

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)


def default_comm(timeout_seconds: float = 600.0) -> Comm:
    """``TorchComm`` when torch.distributed is initialised with more than one rank, else ``LocalComm``."""
    try:
        import torch.distributed as dist
    except ImportError:  # torch built without distributed support
        return LocalComm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm(timeout_seconds)
    return LocalComm()
