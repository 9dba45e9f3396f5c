"""Rank bodies for tests/distributed/test_read_once.py (module-level so spawn can pickle them by reference)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ckptstore import CheckpointManager, IOOptions, PerRank


def _model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(96, 96) for _ in range(6)], nn.LayerNorm(96))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 96)).sum().backward()
    opt.step()
    return model, opt


def save(rank: int, world: int, url: str, opts: dict[str, Any], env: dict[str, str]) -> int:
    os.environ.update(env)
    model, opt = _model(0)
    mgr = CheckpointManager(url, storage_options=opts)
    res = mgr.save(3, {"model": model, "optim": opt, "rank": PerRank(torch.full((4,), float(rank)))})
    mgr.close()
    return res.nbytes


def restore(
    rank: int, world: int, url: str, opts: dict[str, Any], env: dict[str, str], read_once: bool
) -> dict[str, Any]:
    os.environ.update(env)
    want, want_opt = _model(0)
    model, opt = _model(1)  # other values, same shapes
    mine = PerRank(torch.zeros(4))
    mgr = CheckpointManager(url, storage_options=opts, io=IOOptions(read_once=read_once, read_chunk_bytes=1 << 20))
    info = mgr.restore({"model": model, "optim": opt, "rank": mine})
    same = all(torch.equal(a, b) for a, b in zip(want.state_dict().values(), model.state_dict().values()))
    s_want, s_got = want_opt.state_dict()["state"], opt.state_dict()["state"]
    same_opt = all(torch.equal(s_want[k][n], s_got[k][n]) for k in s_want for n in ("exp_avg", "exp_avg_sq", "step"))
    mgr.close()
    return {"step": info.step, "same": same, "same_opt": same_opt, "rank_value": mine.value.tolist()}


def save_local(rank: int, world: int, root: str, step: int, seed: int) -> int:
    model, opt = _model(seed)
    mgr = CheckpointManager(root)
    res = mgr.save(step, {"model": model, "optim": opt})
    mgr.close()
    return res.nbytes


def restore_local(rank: int, world: int, root: str, fail_rank: int | None) -> dict[str, Any]:
    """Restore "latest"; on ``fail_rank`` the first read of its share raises a storage error (a flaky mount)."""
    import ckptstore.restore.shared as shared

    if rank == fail_rank:
        real = shared.read_pieces
        calls = {"n": 0}

        def flaky(*args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(5, "Input/output error (injected)")
            real(*args, **kwargs)

        shared.read_pieces = flaky  # type: ignore[assignment]
    want1, _ = _model(1)
    model, opt = _model(7)
    mgr = CheckpointManager(root)
    info = mgr.restore({"model": model, "optim": opt})
    mgr.close()
    same1 = all(torch.equal(a, b) for a, b in zip(want1.state_dict().values(), model.state_dict().values()))
    want2, _ = _model(2)
    same2 = all(torch.equal(a, b) for a, b in zip(want2.state_dict().values(), model.state_dict().values()))
    return {"step": info.step, "same1": same1, "same2": same2}
