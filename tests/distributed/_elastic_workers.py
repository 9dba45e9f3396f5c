"""Per-rank body of the elastic data-position tests (run by ``tests.fixtures.dist.run_ranks``).

One launch is one "job" of a preemptible run: restore the newest step if there is one (model, optimizer and
the ElasticSampler as replicated state), train a DDP model on a toy dataset of ids through a prefetching
DataLoader (worker processes), append every consumed id to a per-leg, per-rank file, and at ``stop_step`` save
and exit — the preemption. Without ``stop_step`` the job finishes its epochs and saves once more at the end.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ckptstore import CheckpointManager
from ckptstore.elastic import ElasticSampler
from ckptstore.options import IOOptions


class Ids(Dataset):
    """Sample ``i`` is the id ``i``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _save(mgr: CheckpointManager, step: int, state: dict[str, Any], sampler: ElasticSampler) -> dict[str, Any]:
    # What every rank would contribute: the manager keeps rank 0's copy without comparing, so compare here.
    mine = sampler.state_dict()
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    mgr.save(step, state, epoch=sampler.epoch)
    return {
        "step": step,
        "state": mine,
        "every_rank": every,
        "yielded": sampler.yielded,
        "consumed_this_pass": sampler.consumed_this_pass,
    }


def elastic_leg(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    n, batch, epochs = cfg["n"], cfg["batch"], cfg["epochs"]
    # run_ranks starts the ranks as daemonic processes, and multiprocessing refuses to let those start the
    # DataLoader's workers. The workers are shut down before this function returns (the loader's iterator goes
    # out of scope), and DataLoader workers exit on their own when their parent dies.
    multiprocessing.current_process().daemon = False
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(cfg["root"], io=IOOptions(timeout_seconds=60))
    sampler = ElasticSampler(Ids(n), seed=cfg["seed"])  # world size and rank from torch.distributed
    out: dict[str, Any] = {"world": sampler.num_replicas, "rank": sampler.rank, "restored": None, "saves": []}
    step = 0
    if mgr.latest() is not None:
        step = mgr.restore({"model": model, "optim": opt, "data": sampler}).step
        out["restored"] = {"step": step, "state": sampler.state_dict()}
    workers = cfg["num_workers"]
    loader = DataLoader(
        Ids(n),
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        # fork, as under torchrun on Linux (the rank itself was spawned, and spawned workers would re-import torch)
        multiprocessing_context="fork" if workers else None,
    )
    state = {"model": model, "optim": opt, "data": sampler}
    path = os.path.join(cfg["ids_dir"], f"leg{cfg['leg']}-rank{rank}.txt")
    with open(path, "a") as log:
        for epoch in range(sampler.epoch, epochs):
            sampler.set_epoch(epoch)  # keeps the restored position in the restored epoch
            for ids in loader:
                loss = ddp(ids.float().unsqueeze(1)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                log.write("".join(f"{epoch} {i}\n" for i in ids.tolist()))
                log.flush()
                sampler.advance(len(ids))
                step += 1
                if step == cfg.get("stop_step"):
                    out["saves"].append(_save(mgr, step, state, sampler))
                    mgr.close()
                    return out  # preempted: the process exits, prefetched batches are lost
        out["saves"].append(_save(mgr, step + 1, state, sampler))
    mgr.close()
    return out
