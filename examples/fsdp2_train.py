"""FSDP2 (``fully_shard``) on CPU/gloo with ckptstore: sharded save, resharded restore at any world size.

    torchrun --nproc_per_node 2 examples/fsdp2_train.py --root /tmp/fsdp-ckpt    # train, save, restore, verify
    torchrun --nproc_per_node 3 examples/fsdp2_train.py --root /tmp/fsdp-ckpt    # resume it on 3 ranks (2 -> 3)
    torchrun --nproc_per_node 1 examples/fsdp2_train.py --root /tmp/fsdp-ckpt    # ... or on 1 (consolidated)

The recipe (model *and* optimizer state as DTensor shards, keyed by parameter name):

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim)            # this rank's shards; creates the optimizer state if empty
    mgr.save(step, {"model": msd, "optim": osd})       # every rank: each writes its own shards, once
    ...
    msd, osd = get_state_dict(model, optim)            # the *current* sharding, possibly another world size
    mgr.restore({"model": msd, "optim": osd})          # each rank reads the byte ranges of its shards into them
    set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd)

``get_state_dict`` matters on restore: a fresh optimizer has no state yet, and it creates it (sharded like the
parameters), so ckptstore has DTensors of the right local shape to read into. The checkpoint's metadata carries
a digest of the full (unsharded) state, so a run at another world size verifies what it restored.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptstore import CheckpointManager, PerRank

WIDTH, LAYERS = 96, 6


def make_model(seed: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        *[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.GELU())], nn.Linear(WIDTH, 10)
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def full_digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """sha256 of the full (all-gathered) model and optimizer state: identical at every world size."""
    opts = StateDictOptions(full_state_dict=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    h = hashlib.sha256()

    def walk(path: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(f"{path}/{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{path}/{i}", x)

    walk("model", msd)
    walk("optim", osd["state"])
    return h.hexdigest()


def restore(mgr: CheckpointManager, model: nn.Module, opt: torch.optim.Optimizer, step: Any = "latest") -> Any:
    msd, osd = get_state_dict(model, opt)
    info = mgr.restore({"model": msd, "optim": osd}, step=step)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="checkpoint root (default: a fresh temporary directory)")
    ap.add_argument("--steps", type=int, default=4, help="training steps to run before saving")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    root = args.root
    if root is None:
        box = [tempfile.mkdtemp(prefix="ckptstore-fsdp2-") if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        root = box[0]

    model, opt = make_model(seed=0, world=world)
    mgr = CheckpointManager(root, io={"timeout_seconds": 120})
    start = 0
    if mgr.steps():
        info = restore(mgr, model, opt)
        ok = full_digest(model, opt) == info.metadata["digest"]
        start = info.step
        if rank == 0:
            print(f"resumed step {info.step} saved by {info.world_size} ranks on {world} ranks: digest ok={ok}")
        assert ok

    for step in range(start + 1, start + args.steps + 1):
        g = torch.Generator().manual_seed(step * 100 + rank)
        loss = model(torch.randn(16, WIDTH, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step = start + args.steps

    digest = full_digest(model, opt)
    msd, osd = get_state_dict(model, opt)
    w = msd["0.weight"]
    print(
        f"[rank {rank}] 0.weight: global {list(w.shape)}, local shard {list(w.to_local().shape)} {w.placements}",
        flush=True,
    )
    res = mgr.save(
        step,
        {"model": msd, "optim": osd, "rng": PerRank(torch.get_rng_state())},
        metrics={"loss": loss.detach().item()},
        metadata={"digest": digest},
    )
    if rank == 0:
        m = mgr.manifest(step)
        per_rank = [0] * world
        for e in m.tensors.values():
            for p in e.pieces:
                per_rank[int(p.file.split("-r")[1].split("-")[0])] += p.nbytes
        print(f"saved step {step} to {res.url}: {res.nbytes} B in {res.files} files; per rank {per_rank}")

    # Restore into a differently initialised model and check the full state is bit-identical.
    fresh, fresh_opt = make_model(seed=1, world=world)
    restore(mgr, fresh, fresh_opt, step=step)
    ok = full_digest(fresh, fresh_opt) == digest
    if rank == 0:
        print(f"restored step {step} into a fresh FSDP2 model on {world} ranks: bit-exact={ok}")
        sd = mgr.load(step)  # consolidated: plain full tensors (load() needs no other rank)
        print(f"load(): model/0.weight {list(sd['model']['0.weight'].shape)} (full), keys {len(sd['model'])}")
    mgr.close()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
