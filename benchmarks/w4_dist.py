"""W4: a DDP or FSDP2 training state saved by 2 ranks, restored by 1 (one job of ``benchmarks.run``).

* ``save`` (recorded as ``save (2 ranks)``): the job process forks 2 ranks (gloo on CPU, rendezvous
  ``TCPStore`` hosted by rank 0 on a free 127.0.0.1 port; both die with the job). Each rank builds the same
  :class:`~benchmarks.workloads.LayerStack` from seed 0, wraps it in ``DistributedDataParallel`` (W4-DDP: every
  rank holds every tensor) or shards every layer and the root with FSDP2 ``fully_shard`` (W4-FSDP2: each rank
  holds half of every tensor as a ``DTensor``), creates the AdamW state with one step, and takes the
  ``get_state_dict(model, optim)`` recipe's ``{"model": msd, "optim": osd}``. After a barrier each rank times
  ``Contender.save_dict`` (ckptstore ``mgr.save`` on every rank; DCP ``dcp.save`` with the default process
  group); the save takes the slower rank's time, the RSS the larger rank's peak over its baseline, the S3
  requests the sum over ranks. The fingerprint is taken from the full state (DDP: rank 0's replica; FSDP2:
  ``full_state_dict=True``, gathered after the timed region).
* ``restore`` (recorded as ``restore (1 rank)``): in the job process, no process group: a plain
  ``LayerStack`` + AdamW from seed 1 (every byte differs), then, timed, the recipe ``get_state_dict`` ->
  ``Contender.restore_dict`` (in place) -> ``set_state_dict``. Its fingerprint must equal the save's.

Used by ``benchmarks.worker``; run with ``python -m benchmarks.run --workloads W4``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .contenders import Contender, make_contender
from .workloads import LayerStack, Workload, WorkloadSpec, adamw_one_step, w4_layers, w4_rows

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the job process is killed (runner timeout), its ranks go too instead of lingering."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def fork_ranks(
    world: int, args_of: Callable[[int], tuple], target: Callable[..., None], timeout: float, name: str
) -> list[dict[str, Any]]:
    """Fork ``world`` ranks running ``target(*args_of(rank), conn)`` and collect each one's result dict from
    its pipe (``{"error": ...}`` for a rank that gave none within ``timeout`` or died); every rank is joined,
    and killed by its handle if it outlives the collection."""
    # fork: the ranks start in milliseconds from this process, which already imported torch/ckptstore/DCP and
    # runs no threads yet (the rendezvous store lives in rank 0, not here).
    ctx = mp.get_context("fork")
    conns, procs = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(*args_of(rank), child), name=f"{name}{rank}")
        p.start()
        child.close()
        conns.append(parent)
        procs.append(p)
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        for rank, conn in enumerate(conns):
            try:
                if conn.poll(max(0.0, deadline - time.monotonic())):
                    results.append(conn.recv())
                else:
                    results.append({"error": f"rank {rank} gave no result within {timeout:.0f} s"})
            except EOFError:
                results.append({"error": f"rank {rank} died without a result (exit code {procs[rank].exitcode})"})
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():  # our own child, by its handle
                p.kill()
                p.join()
    return results


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    spec = WorkloadSpec(**job["workload"])
    c = make_contender(job["contender"])
    c.storage_options = job.get("storage_options")
    if not c.dist_ok:
        raise ValueError(f"{c.label} has no multi-rank save (W4 runs ckptstore and dcp)")
    if job["op"] == "save":
        return _save_on_ranks(job)
    if job["op"] == "restore":
        return _restore_one_rank(spec, c, job)
    raise ValueError(f"W4 has no op {job['op']!r} (save at 2 ranks, restore at 1)")


# -- save at 2 ranks ----------------------------------------------------------------------------------------------
def _save_on_ranks(job: dict[str, Any]) -> dict[str, Any]:
    port = _free_port()
    timeout = float(job.get("timeout", 1200.0))
    results = fork_ranks(WORLD, lambda rank: (rank, port, job, timeout), _rank_main, timeout, "ckpt-bench-rank")
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(results) if "error" in r]
    if errors:
        tb = "\n".join(r.get("traceback", "") for r in results)
        return {"error": "; ".join(errors), "traceback": tb}
    r0 = results[0]
    by_op: dict[str, int] = {}
    for r in results:
        for k, v in (r.get("requests_by_op") or {}).items():
            by_op[k] = by_op.get(k, 0) + v
    out = {
        "seconds": max(r["seconds"] for r in results),
        "rank_seconds": [r["seconds"] for r in results],
        "rss_base": r0["rss_base"],
        "rss_peak": max(r["rss_peak"] for r in results),
        "rss_over": max(r["rss_over"] for r in results),
        "rss_method": r0["rss_method"] + " (max over ranks)",
        "build_seconds": max(r["build_seconds"] for r in results),
        "fingerprint": r0["fingerprint"],
        "pid": os.getpid(),
        "world_size": WORLD,
    }
    if "requests" in r0:
        out["requests"] = sum(r["requests"] for r in results)
        out["requests_by_op"] = by_op
    return out


def _rank_main(rank: int, port: int, job: dict[str, Any], timeout: float, conn: Any) -> None:
    _die_with_parent()
    try:
        res = _rank_save(rank, port, job, timeout)
    except BaseException as e:  # reported to the job process, which reports to the runner
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    conn.send(res)
    conn.close()
    os._exit(0)  # no interpreter teardown (torch's atexit hooks, gloo threads)


def wrap(spec: WorkloadSpec, model: LayerStack) -> nn.Module:
    """DDP replicas or FSDP2 shards of ``model`` over the default process group."""
    if spec.name == "W4-DDP":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _rank_save(rank: int, port: int, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from .worker import collect_tensors, fingerprint, measured, request_counter

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    spec = WorkloadSpec(**job["workload"])
    c: Contender = make_contender(job["contender"])
    c.storage_options = job.get("storage_options")
    counter = request_counter(job)
    td = _dt.timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0, timeout=td)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=td)
    try:
        t_build = time.perf_counter()
        model = wrap(spec, LayerStack(w4_layers(spec), w4_rows(spec), seed=0))
        optim = adamw_one_step(model)
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd}
        t_build = time.perf_counter() - t_build
        gc.collect()
        gc.unfreeze()  # as in the worker: automatic collections cost what they cost in a normal process
        dist.barrier()
        _, out = measured(lambda: c.save_dict(state, job["path"]), counter)
        dist.barrier()
        if spec.name == "W4-DDP":
            fp = fingerprint(collect_tensors(state)) if rank == 0 else None
        else:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            fmsd, fosd = get_state_dict(model, optim, options=opts)  # a collective: every rank takes part
            fp = fingerprint(collect_tensors({"model": fmsd, "optim": fosd})) if rank == 0 else None
            del fmsd, fosd
        dist.barrier()  # nobody exits while a peer still talks to it
        return {**out, "build_seconds": t_build, "fingerprint": fp}
    finally:
        dist.destroy_process_group()


# -- restore at 1 rank --------------------------------------------------------------------------------------------
def _restore_one_rank(spec: WorkloadSpec, c: Contender, job: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .worker import fingerprint, measured, request_counter

    counter = request_counter(job)
    t_build = time.perf_counter()
    wl = Workload(spec, seed=1)  # plain LayerStack + AdamW state, every byte different from the saved one
    t_build = time.perf_counter() - t_build
    assert wl.optim is not None
    optim = wl.optim
    gc.collect()
    gc.unfreeze()

    def restore() -> None:
        # The recipe (examples/fsdp2_train.py): this process's view of the state, filled in place, handed back.
        msd, osd = get_state_dict(wl.model, optim)
        c.restore_dict({"model": msd, "optim": osd}, job["path"])
        set_state_dict(wl.model, optim, model_state_dict=msd, optim_state_dict=osd)

    _, out = measured(restore, counter)
    fp = fingerprint(list(wl.flat().values()))
    return {**out, "build_seconds": t_build, "fingerprint": fp, "pid": os.getpid(), "world_size": 1}


__all__ = ["run_job", "wrap"]
