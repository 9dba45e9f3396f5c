"""Rank bodies for tests/distributed/test_group_crc.py (module-level so spawn can pickle them by reference)."""

from __future__ import annotations

from typing import Any

from ckptstore import CheckpointManager, IOOptions
from tests.distributed._workers import FSDP_WIDTH, fsdp_full_state, fsdp_model, make_mlp, train


def save(rank: int, world: int, root: str, step: int, seed: int) -> dict[str, Any] | None:
    """An FSDP2 model + Adam (trained one step, so the moments exist) saved as ``step``; rank 0 returns the full
    state (torch's own all-gather)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, _ = fsdp_model(world, seed=seed)
    train(model, opt, 1, rank, FSDP_WIDTH, seed=seed)
    msd, osd = get_state_dict(model, opt)
    mgr = CheckpointManager(root)
    mgr.save(step, {"model": msd, "optim": osd})
    mgr.close()
    full = fsdp_full_state(model, opt)
    return full if rank == 0 else None


def restore_fsdp(rank: int, world: int, root: str, model_only: bool) -> dict[str, Any]:
    """Restore "latest" into a fresh FSDP2 model (each rank its own shards: direct reads of its parts)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, _ = fsdp_model(world, seed=7)
    train(model, opt, 1, rank, FSDP_WIDTH, seed=7)
    msd, osd = get_state_dict(model, opt)
    mgr = CheckpointManager(root)
    state = {"model": msd} if model_only else {"model": msd, "optim": osd}
    info = mgr.restore(state)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    mgr.close()
    full = fsdp_full_state(model, opt)
    return {"step": info.step, "full": full if rank == 0 else None}


def restore_replicated(rank: int, world: int, root: str) -> dict[str, Any]:
    """Restore "latest" into a plain (unsharded) copy of the model on every rank: every rank needs every part
    of every row, so the parts are read once per job by their owners and broadcast (``read_once``)."""
    model = make_mlp(layers=3, width=FSDP_WIDTH, out=3, seed=11)
    mgr = CheckpointManager(root, io=IOOptions(read_once=True))
    info = mgr.restore({"model": model})
    mgr.close()
    return {"step": info.step, "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
