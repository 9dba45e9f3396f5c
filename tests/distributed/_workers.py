"""Per-rank bodies of the distributed tests (run by ``tests.fixtures.dist.run_ranks`` in real processes).

Module-level and importable on purpose: ``spawn`` pickles them by reference. Each returns plain data (tensors,
dicts) that the test process checks; assertions live in the tests, not here, so a failure names the rank.
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointError, DistributedSaveError, UnsupportedValueError
from ckptstore.format.state import PerRank
from ckptstore.options import IOOptions

# -- models and helpers shared with the tests ----------------------------------------------------------------


def make_mlp(layers: int = 16, width: int = 64, out: int | None = None, seed: int = 0) -> nn.Sequential:
    """``layers`` equal Linear(width, width) blocks (+ an optional narrow head): the balance workload."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    if out is not None:
        mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int, width: int, seed: int = 0) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(1000 * seed + 10 * i + rank)  # different data on every rank
        x = torch.randn(8, width, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of the model's and the optimizer's state dicts (plain tensors)."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": copy.deepcopy(opt.state_dict()),
    }


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def count_reads(mgr: CheckpointManager) -> list[int]:
    """Make ``mgr`` count the bytes it reads from storage (a one-element list, updated in place)."""
    box = [0]
    orig = mgr.storage.read_into

    def read_into(rel: str, offset: int, buffers: Any) -> None:
        box[0] += sum(memoryview(b).nbytes for b in buffers)
        orig(rel, offset, buffers)

    mgr.storage.read_into = read_into  # type: ignore[method-assign]
    return box


def _error_info(e: DistributedSaveError, t0: float) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "failed_ranks": dict(e.failed_ranks),
        "message": str(e),
        "seconds": time.perf_counter() - t0,
    }


# -- DDP -----------------------------------------------------------------------------------------------------
WIDTH = 64


def ddp_two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    """1->2 restore, chunked replicated tensor, model+optim+per-rank save, injected OSError on rank 1,
    restore of the previous step and a save after the failure — in one launch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    mgr = CheckpointManager(root, io=IOOptions(chunk_bytes=32 << 10, timeout_seconds=60))
    model = make_mlp(seed=123)  # differs from what the test process saved: restore must change it
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ddp = DDP(model)

    # Step 1 was saved by a single process. Rank 1 is made to see no committed step at all: "latest" must
    # come from rank 0's decision, not from each rank's own listing.
    if rank == 1:
        mgr.steps = lambda: []  # type: ignore[method-assign]
    reads = count_reads(mgr)
    info = mgr.restore({"model": model, "optim": opt})
    if rank == 1:
        del mgr.steps
    out["restored_1"] = {
        "step": info.step,
        "world_size": info.world_size,
        "state": snapshot(model, opt),
        "read_bytes": reads[0],
    }

    # Restore errors reach every rank with one type instead of leaving the others waiting: rank 0 cannot
    # pick a "best" step (no step has a loss yet); rank 1 alone has a model that does not fit.
    out["restore_errors"] = {}
    for case in ("best", "mismatch"):
        target = make_mlp(width=32) if case == "mismatch" and rank == 1 else model
        try:
            mgr.restore({"model": target}, step="best" if case == "best" else 1)
            out["restore_errors"][case] = None
        except CheckpointError as e:
            out["restore_errors"][case] = (type(e).__name__, str(e))

    train(ddp, opt, 2, rank, WIDTH)
    big = torch.arange(1000 * WIDTH, dtype=torch.float32).reshape(1000, WIDTH)  # 250 KiB > chunk_bytes
    mgr.save(2, {"big": big})

    rng = torch.get_rng_state()
    state = {"model": model, "optim": opt, "rng": PerRank(rng), "sampler": PerRank({"rank": rank, "pos": 100 + rank})}
    res = mgr.save(3, state, epoch=1, metrics={"loss": 0.5})
    out["save_3"] = {"nbytes": res.nbytes, "files": res.files, "seconds": res.seconds}
    out["state_3"] = snapshot(model, opt)
    out["rng_3"] = rng.clone()

    # Rank 1's storage fails while writing step 4: nobody may commit, every rank must raise.
    train(ddp, opt, 1, rank, WIDTH, seed=1)
    orig_open = mgr.storage.open_write
    if rank == 1:

        def failing_open(rel: str, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, "injected: no space left on device", rel)

        mgr.storage.open_write = failing_open  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        mgr.save(4, {"model": model, "optim": opt})
        out["fault"] = None
    except DistributedSaveError as e:
        out["fault"] = _error_info(e, t0)
    mgr.storage.open_write = orig_open  # type: ignore[method-assign]

    # The process group is still healthy: the previous step restores and the next save commits.
    rng_box, sampler_box = PerRank(None), PerRank(None)
    info = mgr.restore({"model": model, "optim": opt, "rng": rng_box, "sampler": sampler_box}, step="latest")
    out["restored_3"] = {
        "step": info.step,
        "state": snapshot(model, opt),
        "rng": rng_box.value,
        "sampler": sampler_box.value,
    }
    train(ddp, opt, 1, rank, WIDTH, seed=2)
    out["save_5"] = mgr.save(5, {"model": model, "optim": opt}).step
    mgr.close()
    return out


class Accumulator(nn.Module):
    """Adds its input's mean to a 128 KiB buffer in every forward (a buffer too large to be copied at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("acc", torch.zeros(32768))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.acc.add_(x.detach().mean())
        return x


def ddp_overlap(rank: int, world: int, root: str) -> dict[str, Any]:
    """``overlap_staging``: async saves while DDP training goes straight on; then rank 1 alone changes a saved
    tensor behind the optimizer's back, which must fail the save on every rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ckptstore.staging import StagingPool

    mgr = CheckpointManager(root, io=IOOptions(timeout_seconds=60), overlap_staging=True)
    model = make_mlp(layers=4, width=256, seed=0)  # 256 KiB weights: copied in the background
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ddp = DDP(model)
    train(ddp, opt, 2, rank, 256)
    pending = mgr.save(1, {"model": model, "optim": opt}, blocking=False)
    saved = snapshot(model, opt)  # reading is always allowed
    train(ddp, opt, 2, rank, 256, seed=1)  # the first optimizer step waits for the copy
    res = pending.wait()
    out: dict[str, Any] = {"saved": saved, "after": snapshot(model, opt), "step": res.step}

    # Rank 1's copy is held back until it has changed a weight in place without waiting: a torn snapshot.
    gate = threading.Event()
    orig = StagingPool.stage

    def held(self: StagingPool, key: str, t: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():  # save() copies small tensors itself
            gate.wait(30)
        return orig(self, key, t)

    if rank == 1:
        StagingPool.stage = held  # type: ignore[method-assign]
    pending = mgr.save(2, {"model": model, "optim": opt}, blocking=False)
    if rank == 1:
        with torch.no_grad():
            model[0].weight.mul_(2)
        gate.set()
    try:
        pending.wait()
        out["fault"] = None
    except CheckpointError as e:
        out["fault"] = {"type": type(e).__name__, "msg": str(e), "failed": sorted(getattr(e, "failed_ranks", {}))}
    StagingPool.stage = orig  # type: ignore[method-assign]
    out["steps"] = mgr.steps()

    # A buffer above overlap.SMALL_BYTES that forward changes: DDP's forward broadcasts rank 0's buffers into the
    # other ranks' buffers before any hook of the wrapped modules runs, so the DDP forward itself must wait.
    acc_model = nn.Sequential(nn.Linear(WIDTH, WIDTH), Accumulator())
    acc_ddp = DDP(acc_model)
    acc_ddp(torch.full((8, WIDTH), float(rank + 1)))  # the ranks' buffers differ now
    want = acc_model[1].acc.clone()
    gate.clear()
    StagingPool.stage = held  # type: ignore[method-assign]
    pending = mgr.save(3, {"bn": acc_model}, blocking=False)
    threading.Timer(0.3, gate.set).start()
    acc_ddp(torch.full((8, WIDTH), 5.0))  # broadcasts buffers, then changes them
    StagingPool.stage = orig  # type: ignore[method-assign]
    try:  # each rank's buffer is its own (not a replica): the replica check refuses to keep rank 0's only
        pending.wait()
        out["bn_save"] = "saved"
    except CheckpointError as e:
        out["bn_save"] = f"{type(e).__name__}: {e}"
    out["bn_want"] = want
    out["bn_staged"] = mgr.preparer.staging._bufs["bn/1.acc"].clone()
    out["bn_now"] = acc_model[1].acc.clone()
    mgr.close()
    return out


def schedule_during_async_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """``mgr.on_preemption()``'s agreement runs on the training thread while a background save runs its own
    collectives. Rank 1's background save is held until its ``should_save`` returned, so the two ranks start
    the two collectives in opposite orders; on one shared group they would pair the wrong messages."""
    mgr = CheckpointManager(root, io=IOOptions(timeout_seconds=20))
    schedule = mgr.on_preemption(signals=(), every_steps=2)
    go = threading.Event()
    orig = mgr.protocol.run  # the save protocol a background save runs: ckptstore.save.protocol.SaveProtocol.run

    def held(job: Any) -> Any:
        go.wait(30)
        return orig(job)

    if rank == 1:
        mgr.protocol.run = held  # type: ignore[method-assign]
    pending = mgr.save(1, {"w": torch.full((1000,), 1.0)}, blocking=False)
    if rank == 0:
        time.sleep(0.5)  # rank 0's background save is inside its first collective by now
    t0 = time.monotonic()
    decisions = [schedule.should_save(2), schedule.should_save(3)]
    go.set()
    res = pending.wait()
    out = {"decisions": decisions, "step": res.step, "agree_seconds": time.monotonic() - t0, "steps": mgr.steps()}
    mgr.close()
    return out


def ddp_balance(rank: int, world: int, root: str, layers: int) -> dict[str, Any]:
    """Save a DDP model of many equal layers + Adam, then restore it over perturbed parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    mgr = CheckpointManager(root, io=IOOptions(timeout_seconds=60))
    model = make_mlp(layers=layers, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ddp = DDP(model)
    train(ddp, opt, 2, rank, WIDTH)
    res = mgr.save(1, {"model": model, "optim": opt})
    saved = snapshot(model, opt)
    train(ddp, opt, 1, rank, WIDTH, seed=1)
    # A background save: the collectives run on the manager's thread, training goes on meanwhile.
    pending = mgr.save(2, {"model": model, "optim": opt}, blocking=False)
    saved_async = snapshot(model, opt)
    train(ddp, opt, 1, rank, WIDTH, seed=2)
    pending.wait()
    perturb(model)
    reads = count_reads(mgr)
    mgr.restore({"model": model, "optim": opt}, step=1)
    restored = snapshot(model, opt)
    mgr.restore({"model": model, "optim": opt})  # latest: the background save
    mgr.close()
    return {
        "saved": saved,
        "restored": restored,
        "saved_async": saved_async,
        "restored_async": snapshot(model, opt),
        "nbytes": res.nbytes,
        "read_bytes": reads[0],
    }


# -- FSDP2 ---------------------------------------------------------------------------------------------------
FSDP_WIDTH = 50  # not a multiple of 3 or 4: uneven shards, and the 3-row head leaves rank 3 of 4 empty


def fsdp_model(world: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_mlp(layers=3, width=FSDP_WIDTH, out=3, seed=seed)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt, mesh


def fsdp_full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (unsharded) model and optimizer state through torch's own all-gather path (a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    return copy.deepcopy({"model": msd, "optim": osd})


def _full(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fsdp_job(rank: int, world: int, root: str, job: dict[str, Any]) -> dict[str, Any]:
    """Restore the steps in ``job["restore"]`` into a fresh FSDP2 model (resharding when the world size
    differs), then train and optionally save ``job["save"]`` and check a same-world restore."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out: dict[str, Any] = {"restored": {}, "read_bytes": {}}
    # Tiny chunks make these tiny tensors behave like big ones: shards stored as several row-range pieces, so a
    # resharded restore reads little beyond its box (a piece straddling the box is read whole, for its crc).
    mgr = CheckpointManager(root, io=IOOptions(chunk_bytes=1024, timeout_seconds=60))
    model, opt, mesh = fsdp_model(world, seed=job["seed"])
    rep = distribute_tensor(torch.zeros(64), mesh, [Replicate()])

    def restore(step: int) -> int:
        # The recipe: get_state_dict gives this rank's shards (and creates the optimizer state so there is
        # something to read into); restore fills them in place; set_state_dict hands them back.
        msd, osd = get_state_dict(model, opt)
        reads = count_reads(mgr)
        mgr.restore({"model": msd, "optim": osd, "rep": rep}, step=step)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        return reads[0]

    if job.get("check_partial"):
        from torch.distributed.tensor import DTensor, Partial

        partial = DTensor.from_local(torch.ones(4), mesh, [Partial()])
        try:
            mgr.save(1000, {"p": partial})
            out["partial"] = None
        except UnsupportedValueError as e:
            out["partial"] = str(e)

    for step in job.get("restore", []):
        out["read_bytes"][step] = restore(step)
        full = fsdp_full_state(model, opt)
        full["rep"] = _full(rep).clone()
        out["restored"][step] = full if rank == 0 else None

    train(model, opt, 2, rank, FSDP_WIDTH, seed=job["seed"])
    if job.get("save") is not None:
        step = job["save"]
        msd, osd = get_state_dict(model, opt)
        extra: dict[str, Any] = {}
        with torch.no_grad():
            rep.copy_(distribute_tensor(torch.arange(64.0) * (step + 1), mesh, [Replicate()]))
        if world == 4:
            # HSDP-like placement on a 2x2 mesh: replicated across one dim, sharded along the other.
            from torch.distributed.device_mesh import init_device_mesh

            mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            extra["hsdp"] = distribute_tensor(torch.arange(10 * 6.0).reshape(10, 6), mesh2, [Replicate(), Shard(0)])
        state = {"model": msd, "optim": osd, "rep": rep, **extra, "rng": PerRank(torch.get_rng_state())}
        t0 = time.perf_counter()
        res = mgr.save(step, state)
        out["save_seconds"] = time.perf_counter() - t0
        out["nbytes"] = res.nbytes
        full = fsdp_full_state(model, opt)
        full["rep"] = _full(rep).clone()
        out["saved"] = full if rank == 0 else None
        # Same world size: perturb, restore, compare.
        train(model, opt, 1, rank, FSDP_WIDTH, seed=99)
        out["read_bytes"]["same"] = restore(step)
        full = fsdp_full_state(model, opt)
        full["rep"] = _full(rep).clone()
        out["restored"]["same"] = full if rank == 0 else None
    mgr.close()
    return out


# -- faults --------------------------------------------------------------------------------------------------
def fault_job(rank: int, world: int, root: str, fault: str, victim: int, timeout: float) -> dict[str, Any]:
    """Commit step 1, then let ``victim`` die (``fault="kill"``: SIGKILL) or stall past the timeout
    (``fault="stuck"``) while writing step 2; every other rank must raise DistributedSaveError in time."""
    out: dict[str, Any] = {}
    mgr = CheckpointManager(root, io=IOOptions(timeout_seconds=timeout))
    model = make_mlp(layers=4, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 1, 0, WIDTH)  # same data everywhere: replicated like DDP without the wrapper
    mgr.save(1, {"model": model, "optim": opt})
    out["saved_1"] = snapshot(model, opt)
    train(model, opt, 1, 0, WIDTH, seed=1)
    if rank == victim:
        orig_open = mgr.storage.open_write

        def faulty_open(rel: str, **kwargs: Any) -> Any:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(timeout + 2)  # stuck past the others' deadline, then carry on late
            return orig_open(rel, **kwargs)

        mgr.storage.open_write = faulty_open  # type: ignore[method-assign]
    dist.barrier()  # start the timed save together
    t0 = time.perf_counter()
    try:
        mgr.save(2, {"model": model, "optim": opt})
        out["error"] = None
    except DistributedSaveError as e:
        out["error"] = _error_info(e, t0)
    # A later save on the same manager fails fast instead of waiting for the timeout again.
    t1 = time.perf_counter()
    try:
        mgr.save(3, {"model": model})
        out["after"] = None
    except DistributedSaveError as e:
        out["after"] = _error_info(e, t1)
    return out
