"""Rank bodies for tests/s3/test_manager_s3.py (module-level so spawn can pickle them by reference)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ckptstore import CheckpointManager, PerRank


def ddp_save_to_s3(rank: int, world: int, url: str, opts: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    os.environ.update(env)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    mgr = CheckpointManager(url, storage_options=opts)
    res = mgr.save(7, {"model": model, "optim": opt, "rank": PerRank(rank)})
    fresh = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    fopt = torch.optim.Adam(fresh.parameters())
    mine = PerRank(None)
    info = mgr.restore({"model": fresh, "optim": fopt, "rank": mine})
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    ostate = opt.state_dict()["state"]
    same_opt = all(torch.equal(ostate[k]["exp_avg"], fopt.state_dict()["state"][k]["exp_avg"]) for k in ostate)
    mgr.close()
    return {"nbytes": res.nbytes, "files": res.files, "step": info.step, "same": same, "same_opt": same_opt,
            "rank_value": mine.value}  # fmt: skip
