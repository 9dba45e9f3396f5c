"""Elastic resume: a job preempted at 2 ranks resumes at 3, then at 1, and sees every sample exactly once.

    python examples/elastic_train.py                          # 2 -> 3 -> 1 ranks, temp dir
    python examples/elastic_train.py --worlds 4,2,3 --epochs 2 --root /tmp/elastic-ckpt

Each "job" is a fresh set of processes (gloo on CPU, DDP) that restores the newest step, trains through a
DataLoader with a prefetching worker, saves after ``--steps`` steps and exits, as if preempted; the last job
finishes. The data position is an :class:`ckptstore.elastic.ElasticSampler`, saved once as replicated state:
its global cursor is re-partitioned over whatever world size the next job has. (With ``PerRank`` sampler state,
a rank that did not exist before would start the epoch from scratch.) At the end the example counts the ids
every rank trained on: each of the ``--samples`` ids exactly once per epoch.

DDP needs every rank to take the same number of steps. When ``--samples``, the world sizes and ``--batch``
make the per-rank batch counts of a pass differ (the ranks with one sample more need an extra step), wrap the
loop in ``ddp.join()``; this example does not, and fails at the process-group timeout instead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ckptstore import CheckpointManager
from ckptstore.elastic import ElasticSampler


class Ids(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def job(rank: int, world: int, args: argparse.Namespace, leg: int, last: bool, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    ddp, opt = DDP(model), torch.optim.SGD(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(args.root)
    sampler = ElasticSampler(Ids(args.samples), seed=args.seed)  # world size and rank from torch.distributed
    state = {"model": model, "optim": opt, "data": sampler}  # "data": replicated, saved once
    step = start = 0
    if mgr.latest() is not None:
        step = start = mgr.restore(state).step
    if rank == 0:
        print(f"[job {leg}] {world} ranks, resume at step {step}: epoch {sampler.epoch}, cursor {sampler.cursor}")
    loader = DataLoader(Ids(args.samples), batch_size=args.batch, sampler=sampler, num_workers=1)
    stop = None if last else step + args.steps
    with open(os.path.join(args.ids, f"job{leg}-rank{rank}.txt"), "w") as log:
        for epoch in range(sampler.epoch, args.epochs):
            sampler.set_epoch(epoch)  # no-op in the restored epoch: keeps the restored position
            for ids in loader:
                ddp(ids.float().unsqueeze(1)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                log.write("".join(f"{epoch} {i}\n" for i in ids.tolist()))
                sampler.advance(len(ids))  # what training consumed, not what the loader prefetched
                step += 1
                if step == stop:
                    break
            if step == stop:
                break
    if step > start:
        mgr.save(step, state, epoch=sampler.epoch)
        if rank == 0:
            print(f"[job {leg}] saved step {step}: {sampler.state_dict()}")
    mgr.close()
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="checkpoint directory (default: a new temporary one)")
    p.add_argument("--worlds", default="2,3,1", help="world size of each job, comma-separated")
    p.add_argument("--samples", type=int, default=103)
    p.add_argument("--batch", type=int, default=4, help="per-rank batch size")
    p.add_argument("--steps", type=int, default=6, help="steps per job before it is preempted (all but the last)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.root = args.root or tempfile.mkdtemp(prefix="elastic-")
    args.ids = tempfile.mkdtemp(prefix="elastic-ids-")  # what each rank trained on, one file per job and rank
    worlds = [int(w) for w in args.worlds.split(",")]
    for leg, world in enumerate(worlds):
        mp.spawn(job, args=(world, args, leg, leg == len(worlds) - 1, free_port()), nprocs=world)
    seen: dict[int, Counter[int]] = {}
    for name in os.listdir(args.ids):
        with open(os.path.join(args.ids, name)) as f:
            for line in f:
                e, i = map(int, line.split())
                seen.setdefault(e, Counter())[i] += 1
    ok = all(
        sorted(seen.get(e, Counter())) == list(range(args.samples)) and set(seen[e].values()) == {1}
        for e in range(args.epochs)
    )
    print(f"each of {args.samples} ids exactly once in each of {args.epochs} epoch(s): {ok}   ({args.root})")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
