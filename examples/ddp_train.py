"""DDP on CPU with ckptstore: every rank saves, each writes its share once, then a fresh model restores bit-exactly.

    torchrun --nproc_per_node 2 examples/ddp_train.py                       # temp dir, 5 steps
    torchrun --nproc_per_node 2 examples/ddp_train.py --root /tmp/ddp-ckpt  # keep the checkpoints
    torchrun --nproc_per_node 1 examples/ddp_train.py --root /tmp/ddp-ckpt  # resume there at another world size

What it shows:

* every rank calls ``mgr.save(step, state)`` with the same arguments; replicated tensors (the whole DDP model and
  optimizer) are written once in total, the work split across ranks by bytes (the per-rank figures are printed
  from the manifest);
* ``PerRank(...)`` keeps per-rank state (here the RNG state and a data-loader position) separately per rank;
* restore into a *fresh* model and optimizer, then check it is bit-identical to what was saved. The checkpoint's
  metadata carries a digest of the full state, so a later run at another world size verifies it too.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ckptstore import CheckpointManager, PerRank

WIDTH, LAYERS = 64, 12


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])


def digest(*state_dicts: dict[str, Any]) -> str:
    """sha256 over every tensor (path, dtype, shape, bytes) of nested state dicts, in a stable order."""
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

    for i, sd in enumerate(state_dicts):
        walk(str(i), sd)
    return h.hexdigest()


def bytes_per_rank(mgr: CheckpointManager, step: int) -> list[int]:
    m = mgr.manifest(step)
    out = [0] * m.world_size
    for e in m.tensors.values():
        for p in e.pieces:
            out[int(p.file.split("-r")[1].split("-")[0])] += p.nbytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="checkpoint root (default: a fresh temporary directory)")
    ap.add_argument("--steps", type=int, default=5, help="training steps to run before saving")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    root = args.root
    if root is None:  # one temporary directory for all ranks: rank 0 makes it, everyone learns its name
        box = [tempfile.mkdtemp(prefix="ckptstore-ddp-") if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        root = box[0]

    model = make_model(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ddp = DDP(model)
    mgr = CheckpointManager(root, io={"timeout_seconds": 120})
    sampler = PerRank({"position": 0})  # per-rank data position, restored on the same rank

    start = 0
    if mgr.steps():  # resume: restore the newest verified step (rank 0 decides which, everyone follows)
        rng = PerRank(None)
        info = mgr.restore({"model": model, "optim": opt, "rng": rng, "sampler": sampler})
        ok = digest(model.state_dict(), opt.state_dict()) == info.metadata["digest"]
        if rng.value is not None:  # None when this rank did not exist in the saving job
            torch.set_rng_state(rng.value)
        start = info.step
        print(f"[rank {rank}] resumed step {info.step} (saved by {info.world_size} ranks): digest ok={ok}", flush=True)
        assert ok

    for step in range(start + 1, start + args.steps + 1):
        g = torch.Generator().manual_seed(step * 100 + rank)  # each rank sees different data
        loss = ddp(torch.randn(32, WIDTH, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sampler.value["position"] += 32
    step = start + args.steps

    # The recipe: the same call on every rank. model (not the DDP wrapper) so the keys carry no "module." prefix
    # and the step restores into an unwrapped model too.
    saved_digest = digest(model.state_dict(), opt.state_dict())
    res = mgr.save(
        step,
        {"model": model, "optim": opt, "rng": PerRank(torch.get_rng_state()), "sampler": sampler},
        metrics={"loss": loss.detach().item()},
        metadata={"digest": saved_digest},
    )
    if rank == 0:
        per_rank = bytes_per_rank(mgr, step)
        print(
            f"saved step {step} to {res.url}: {res.nbytes} B of tensors in {res.files} files, {res.seconds:.3f}s; "
            f"bytes written per rank {per_rank} (sum {sum(per_rank)}: each byte once)",
            flush=True,
        )

    # Restore into fresh objects and compare bit for bit.
    fresh = make_model(seed=1)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_sampler = PerRank(None)
    mgr.restore({"model": fresh, "optim": fresh_opt, "sampler": fresh_sampler}, step=step)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    ok = same and digest(fresh.state_dict(), fresh_opt.state_dict()) == saved_digest
    print(f"[rank {rank}] restored step {step}: bit-exact={ok}, sampler={fresh_sampler.value}", flush=True)
    mgr.close()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
