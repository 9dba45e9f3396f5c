"""Real multi-process save and restore (issue #16 item 6): 1, 2, 4, 8 gloo ranks, DDP and FSDP2, local disk and
moto S3; latency, process-group traffic, S3 GETs and bytes per job, peak RSS per rank, bit-exactness.

    python -m benchmarks.ranks                                          # 1,2,4,8 ranks, ddp+fsdp2, local+s3
    python -m benchmarks.ranks --ranks 1,2 --mib 4 --layers 2 --target local --rounds 1 --out /tmp/r.json

For each target, mode and world size one *job* forks ``N`` rank processes from this process (gloo on 127.0.0.1,
rendezvous ``TCPStore`` hosted by rank 0, one torch thread each). Every rank builds the same
:class:`~benchmarks.workloads.LayerStack` (``--mib`` MiB of fp32 weights in ``--layers`` layers, seed 0),
wraps it in ``DistributedDataParallel`` (``ddp``: every rank holds every tensor) or shards every layer and the
root with FSDP2 ``fully_shard`` (``fsdp2``), and makes the AdamW state with one step. Then, ``--rounds`` times:

* **save**: after a barrier every rank times ``mgr.save(round + 1, state)`` (the documented recipes: DDP
  ``{"model": ddp.module, "optim": opt}``, FSDP2 ``get_state_dict`` -> ``{"model": msd, "optim": osd}``); the
  job's save time is the slowest rank's;
* **restore**, once per ``--read-once`` variant (order alternating by round): into a second model of the same
  shape (built once per job from seed 1, wrapped/sharded the same way, with its own AdamW state), re-initialised
  in place before every restore (every parameter and optimizer-state element set to ``POISON``, -1, which no
  saved element equals; checked element by element), every rank times, after a barrier, ``mgr.restore(...,
  step=round + 1)`` on a manager with ``IOOptions(read_once=...)`` (FSDP2: into ``get_state_dict``'s DTensors,
  then ``set_state_dict``, outside the timed call). Building a fresh model per restore instead would add tens of
  seconds of first-touch memory per job (8 ranks on 2 cores), not change what ``restore`` does. Every rank
  then compares every tensor of its restored state (``get_state_dict``, local shards) byte for byte with the
  state it saved; any difference raises ``IntegrityError`` and fails the run.

Measured per rank and operation, summed or maxed over ranks by the job:

* wall time (job: slowest rank), and the time spent inside ``torch.distributed`` collectives called during the
  operation (``gather_object``, ``broadcast``, ``barrier``, ``new_group``, ... wrapped in the rank process for
  the duration of the run; includes waiting for slower ranks);
* bytes the rank sent over its process-group TCP connections (``TCP_INFO.tcpi_bytes_sent`` of the rank's
  sockets, before and after; connections to the rendezvous store and to S3 are left out);
* peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs`` right before the operation) and its rise over the
  RSS just before;
* S3: the HTTP requests by operation (``benchmarks.s3util.RequestCounter``, every attempt) and the bytes of every
  ``GetObject`` answer (its ``Content-Length``), by object; the job sums them over ranks and reports the GET
  bytes of shard files against the checkpoint's tensor bytes (``x ckpt``: 1.0 = every stored tensor byte read
  once per job; ``x files``: against the shard files, headers included).

Results: a markdown table printed and written next to ``--out`` (``benchmarks/results/ranks.md`` and
``ranks.json`` by default).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from ckptstore.errors import CheckpointError, ConfigError, IntegrityError

from .w4_dist import _die_with_parent, _free_port, fork_ranks
from .workloads import LayerStack, MiB, adamw_one_step

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "ranks.json"
MODES = ("ddp", "fsdp2")
TARGETS = ("local", "s3")


# -- measurement helpers (run inside the ranks) ---------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_TCPI_BYTES_ACKED = 120  # struct tcp_info (linux/tcp.h): __u64 tcpi_bytes_acked
_TCPI_BYTES_SENT = 200  # __u64 tcpi_bytes_sent (Linux >= 4.19)


def tcp_sent(exclude_ports: set[int]) -> dict[int, int] | None:
    """Bytes sent so far on each TCP connection of this process, by socket inode; connections whose local or
    peer port is in ``exclude_ports`` (rendezvous store, S3 endpoint) are left out. None if unavailable."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if not link.startswith("socket:["):
            continue
        try:
            s = socket.socket(fileno=os.dup(int(name)))  # a duplicate: closing it leaves the connection alone
        except OSError:
            continue
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            local, peer = s.getsockname(), s.getpeername()
            if local[1] in exclude_ports or peer[1] in exclude_ports:
                continue
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            if len(info) >= _TCPI_BYTES_SENT + 8:
                (sent,) = struct.unpack_from("Q", info, _TCPI_BYTES_SENT)
            elif len(info) >= _TCPI_BYTES_ACKED + 8:
                (sent,) = struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)
            else:
                continue
            out[int(link[8:-1])] = int(sent)
        except OSError:  # not connected (listening), not TCP
            continue
        finally:
            s.close()
    return out


def tcp_delta(before: dict[int, int] | None, after: dict[int, int] | None) -> int | None:
    if before is None or after is None:
        return None
    return sum(v - before.get(k, 0) for k, v in after.items())


class CollectiveTimer:
    """Wall time and calls of ``torch.distributed`` collectives while :attr:`active`, per function name.

    Installed by replacing the functions on the ``torch.distributed`` package (what ``ckptstore.dist`` calls
    through ``dist.<name>``) in the rank process only; nested calls count once."""

    NAMES = (
        "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
        "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather",
        "gather_object", "irecv", "isend", "monitored_barrier", "new_group", "recv", "reduce", "reduce_scatter",
        "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
    )  # fmt: skip

    def __init__(self) -> None:
        self.active = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self.seconds = 0.0
        self.calls: dict[str, int] = {}

    def install(self) -> None:
        import torch.distributed as dist

        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if callable(fn):
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(timer._local, "depth", 0)
            if not timer.active or depth:
                return fn(*args, **kwargs)
            timer._local.depth = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                timer._local.depth = 0
                with timer._lock:
                    timer.seconds += dt
                    timer.calls[name] = timer.calls.get(name, 0) + 1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def reset(self) -> None:
        with self._lock:
            self.seconds = 0.0
            self.calls = {}


class GetBytes:
    """Bytes of every S3 ``GetObject`` answer (``Content-Length``) by object name, for every botocore session
    created after :meth:`install` (ckptstore's data path uses botocore), through the ``after-call`` event."""

    _installed: GetBytes | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_object: dict[str, int] = {}

    @classmethod
    def install(cls) -> GetBytes:
        if cls._installed is not None:
            return cls._installed
        import botocore.session

        counter = cls()
        orig_init = botocore.session.Session.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            orig_init(self, *args, **kwargs)
            self.register("after-call.s3.GetObject", counter._on_get)

        botocore.session.Session.__init__ = init  # type: ignore[method-assign]
        cls._installed = counter
        return counter

    def _on_get(self, http_response: Any = None, parsed: Any = None, **_: Any) -> None:
        n = None
        if isinstance(parsed, dict):
            n = parsed.get("ContentLength")
        headers = getattr(http_response, "headers", None) or {}
        if n is None and headers.get("content-length") is not None:
            n = int(headers["content-length"])
        name = urlsplit(str(getattr(http_response, "url", "") or "")).path.rsplit("/", 1)[-1]
        with self._lock:
            self.by_object[name] = self.by_object.get(name, 0) + int(n or 0)

    def reset(self) -> None:
        with self._lock:
            self.by_object = {}

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.by_object)


# -- state: build, flatten, compare -----------------------------------------------------------------------------
def flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict/list structure by path; DTensors as this rank's local shard."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        to_local = getattr(obj, "to_local", None)
        out[prefix] = (to_local() if callable(to_local) else obj).detach()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (bitwise comparison: NaN payloads and -0.0 count)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def compare_states(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[list[str], int, int]:
    """(paths that differ, tensors compared, bytes compared): key sets, dtypes, shapes and every byte."""
    bad = sorted(set(want) ^ set(got))
    n = nbytes = 0
    for k in sorted(set(want) & set(got)):
        a, b = want[k], got[k]
        n += 1
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(k)
            continue
        ra, rb = _raw(a), _raw(b)
        nbytes += ra.numel()
        if not torch.equal(ra, rb):
            bad.append(k)
    return bad, n, nbytes


POISON = -1.0
"""Every element of the restore target before a restore: no saved value is -1 (weights from ``torch.rand`` moved
by one AdamW step of lr 1e-4, non-negative moments, steps of 1), so a byte the restore fails to write stays
wrong and the comparison after it sees the difference."""


def poison(model: Any, optim: torch.optim.Optimizer) -> None:
    """Re-initialise the restore target in place: every parameter and optimizer state element set to POISON."""
    live = list(model.parameters())
    live += [v for st in optim.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        for t in live:
            to_local = getattr(t, "to_local", None)
            (to_local() if callable(to_local) else t).fill_(POISON)


def _rows(mib: float, layers: int) -> int:
    return max(1, int(mib * MiB) // (4 * LayerStack.COLS * layers))


def build(mode: str, world: int, layers: int, rows: int, seed: int) -> tuple[Any, torch.optim.Optimizer]:
    """A LayerStack from ``seed``, DDP-wrapped or FSDP2-sharded over the default group, with AdamW state."""
    model: Any = LayerStack(layers, rows, seed)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, adamw_one_step(model)


def view(model: Any, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return flat_tensors({"model": msd, "optim": osd})


# -- one rank ---------------------------------------------------------------------------------------------------
class _Op:
    """Measure one operation on this rank: wall time, collectives, TCP bytes sent, RSS, S3 requests/bytes."""

    def __init__(self, job: dict[str, Any], timer: CollectiveTimer) -> None:
        self.job = job
        self.timer = timer
        self.exclude = {int(job["port"])} | ({int(job["s3_port"])} if job.get("s3_port") else set())

    def run(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        import torch.distributed as dist

        requests = gets = None
        if self.job.get("s3_port"):
            from .s3util import RequestCounter

            requests, gets = RequestCounter.install(), GetBytes.install()
            requests.reset()
            gets.reset()
        gc.collect()
        dist.barrier()
        base = _status_bytes("VmRSS")
        hwm = _reset_hwm()
        tcp0 = tcp_sent(self.exclude)
        self.timer.reset()
        self.timer.active = True
        t0 = time.perf_counter()
        try:
            result = fn()
        finally:
            seconds = time.perf_counter() - t0
            self.timer.active = False
        tcp1 = tcp_sent(self.exclude)
        peak = _status_bytes("VmHWM") if hwm else _status_bytes("VmRSS")
        out: dict[str, Any] = {
            "seconds": seconds,
            "collective_seconds": self.timer.seconds,
            "collective_calls": dict(self.timer.calls),
            "pg_bytes_sent": tcp_delta(tcp0, tcp1),
            "rss_base": base,
            "rss_peak": peak,
            "rss_rise": max(0, peak - base),
        }
        if requests is not None and gets is not None:
            out["requests_by_op"] = requests.snapshot()
            out["get_bytes_by_object"] = gets.snapshot()
        return result, out


def _rank_body(rank: int, job: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ckptstore import CheckpointManager, IOOptions

    torch.set_num_threads(1)  # up to 8 ranks on 2 cores
    phases: dict[str, float] = {"init": 0.0, "build": 0.0, "targets": 0.0, "checks": 0.0, "close": 0.0}
    t_phase = time.perf_counter()
    world, mode, layers, rows = job["world"], job["mode"], job["layers"], job["rows"]
    td = _dt.timedelta(seconds=float(job["timeout"]))
    store = dist.TCPStore("127.0.0.1", int(job["port"]), world, is_master=rank == 0, timeout=td)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=td)
    phases["init"] = time.perf_counter() - t_phase
    timer = CollectiveTimer()
    timer.install()
    op = _Op(job, timer)
    so = job.get("storage_options")
    # One manager saves; one per read_once variant restores (none has seen a step's manifest before its restore).
    saver = CheckpointManager(job["location"], storage_options=so)
    mgrs = {
        ro: CheckpointManager(job["location"], storage_options=so, io=IOOptions(read_once=ro))
        for ro in job["read_once"]
    }
    try:
        t_phase = time.perf_counter()
        model, optim = build(mode, world, layers, rows, seed=0)
        if mode == "ddp":
            save_state: dict[str, Any] = {"model": model.module, "optim": optim}
        else:
            msd, osd = get_state_dict(model, optim)
            save_state = {"model": msd, "optim": osd}
        want = view(model, optim)
        saved_poison = sum(int((t == POISON).sum()) for t in want.values())
        if saved_poison:
            raise ConfigError(f"benchmark setup: {saved_poison} saved elements equal the restore target's POISON")
        # The restore target: built once (another seed), wrapped the same way, re-initialised before every restore.
        tmodel, toptim = build(mode, world, layers, rows, seed=1)
        phases["build"] = time.perf_counter() - t_phase
        rounds: list[dict[str, Any]] = []
        for r in range(int(job["rounds"])):
            step = r + 1
            res, m_save = op.run(functools.partial(saver.save, step, save_state))
            m_save["nbytes"] = res.nbytes
            rec: dict[str, Any] = {"step": step, "save": m_save, "restore": {}}
            if rank == 0:  # shard file names carry the save's id: each step has its own
                man = saver.manifest(step)
                rec["ckpt_files"] = dict(man.files)
                rec["ckpt_tensor_bytes"] = man.nbytes
            order = list(job["read_once"]) if r % 2 == 0 else list(reversed(job["read_once"]))
            for ro in order:
                t_phase = time.perf_counter()
                poison(tmodel, toptim)
                before = view(tmodel, toptim)
                if set(before) != set(want) or not all(bool((t == POISON).all()) for t in before.values()):
                    raise ConfigError("benchmark setup: re-initialising the restore target did not reach its state")
                del before
                same_before = saved_poison  # every target element is POISON: these many equal the saved state
                phases["targets"] += time.perf_counter() - t_phase
                if mode == "ddp":
                    target: dict[str, Any] = {"model": tmodel.module, "optim": toptim}
                    _, m = op.run(functools.partial(mgrs[ro].restore, target, step=step))
                else:
                    tmsd, tosd = get_state_dict(tmodel, toptim)  # the recipe: this rank's view, filled in place
                    target = {"model": tmsd, "optim": tosd}
                    _, m = op.run(functools.partial(mgrs[ro].restore, target, step=step))
                    set_state_dict(tmodel, toptim, model_state_dict=tmsd, optim_state_dict=tosd)
                t_phase = time.perf_counter()
                got = view(tmodel, toptim)
                if job.get("corrupt_rank") == rank:  # test hook: the check must catch one flipped byte
                    first = sorted(got)[0]
                    flipped = got[first].clone()
                    _raw(flipped)[:1].bitwise_xor_(1)
                    got[first] = flipped
                bad, n, nb = compare_states(want, got)
                phases["checks"] += time.perf_counter() - t_phase
                m.update(exact=not bad, compared_tensors=n, compared_bytes=nb, equal_before=same_before)
                if bad:
                    raise IntegrityError(
                        f"rank {rank}: step {step} restored with read_once={ro} differs from the saved state in "
                        f"{len(bad)} of {n} tensors (first: {bad[:3]}); the restore is not bit-exact"
                    )
                rec["restore"][str(ro).lower()] = m
                del target, got
            rounds.append(rec)
        out: dict[str, Any] = {"rounds": rounds, "local_tensor_bytes": sum(_raw(t).numel() for t in want.values())}
        t_phase = time.perf_counter()
        for mgr in (saver, *mgrs.values()):
            mgr.close()
        phases["close"] = time.perf_counter() - t_phase
        out["phase_seconds"] = phases
        dist.barrier()
        return out
    finally:
        for mgr in (saver, *mgrs.values()):
            mgr.close()  # idempotent
        dist.destroy_process_group()


def _rank_main(rank: int, job: dict[str, Any], conn: Any) -> None:
    _die_with_parent()
    t0 = time.perf_counter()
    try:
        res = _rank_body(rank, job)
        res["rank_seconds"] = time.perf_counter() - t0
    except BaseException as e:  # reported to the driver
        res = {"error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__, "traceback": traceback.format_exc()}
    try:
        conn.send(res)
        conn.close()
    finally:
        os._exit(0)  # no interpreter teardown (gloo threads, torch atexit hooks)


# -- one job: N ranks -------------------------------------------------------------------------------------------
_ERRORS: dict[str, type[CheckpointError]] = {"IntegrityError": IntegrityError, "ConfigError": ConfigError}


def preload(s3: bool) -> None:
    """Import what the ranks use before forking them, so N ranks on 2 cores do not each import it again."""
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.device_mesh
    import torch.distributed.fsdp
    import torch.nn.parallel  # noqa: F401

    import ckptstore

    if s3:
        import botocore.session  # noqa: F401
        import s3fs  # noqa: F401

        import ckptstore.storage.s3  # noqa: F401


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Fork ``job["world"]`` ranks, run them, return each rank's result; raise a typed error if any failed."""
    world = int(job["world"])
    job = {**job, "port": _free_port()}
    # this process imported torch/ckptstore and runs no threads: forked ranks start at once
    results = fork_ranks(world, lambda rank: (rank, job), _rank_main, float(job["timeout"]), "ranks-bench-")
    failed = [(i, r) for i, r in enumerate(results) if "error" in r]
    if failed:
        msg = "; ".join(f"rank {i}: {r['error']}" for i, r in failed)
        tb = "\n".join(r.get("traceback", "") for _, r in failed)
        what = f"{job['target']} {job['mode']} at {world} ranks failed: {msg}\n{tb}"
        kinds = {r.get("error_type") for _, r in failed}
        cls = next((_ERRORS[k] for k in ("IntegrityError", "ConfigError") if k in kinds), CheckpointError)
        raise cls(what)
    return results


# -- aggregation ------------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _opt_max(xs: list[Any]) -> Any:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _opt_sum(xs: list[Any]) -> Any:
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def aggregate(job: dict[str, Any], ranks: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Per round: job times (slowest rank), sums over ranks; then medians over rounds."""
    first = ranks[0]["rounds"][0]
    ckpt_bytes = sum(first["ckpt_files"].values())
    payload = int(first["ckpt_tensor_bytes"])  # the tensor bytes: what a restore of the whole step must read
    nrounds = len(ranks[0]["rounds"])

    def per_op(get: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        rounds = []
        for i in range(nrounds):
            ms = [get(rk["rounds"][i]) for rk in ranks]
            files: dict[str, int] = ranks[0]["rounds"][i]["ckpt_files"]  # this round's step
            r_files, r_payload = sum(files.values()), int(ranks[0]["rounds"][i]["ckpt_tensor_bytes"])
            rec: dict[str, Any] = {
                "seconds": max(m["seconds"] for m in ms),
                "rank_seconds": [m["seconds"] for m in ms],
                "collective_seconds_max": max(m["collective_seconds"] for m in ms),
                "collective_calls_rank0": ms[0]["collective_calls"],
                "pg_bytes_sent_max": _opt_max([m["pg_bytes_sent"] for m in ms]),
                "pg_bytes_sent_job": _opt_sum([m["pg_bytes_sent"] for m in ms]),
                "rss_peak_max": max(m["rss_peak"] for m in ms),
                "rss_rise_max": max(m["rss_rise"] for m in ms),
            }
            if "exact" in ms[0]:
                rec["exact"] = all(m["exact"] for m in ms)
                rec["compared_tensors"] = sum(m["compared_tensors"] for m in ms)
                rec["compared_bytes"] = sum(m["compared_bytes"] for m in ms)
                rec["equal_before"] = sum(m["equal_before"] for m in ms)
            if "requests_by_op" in ms[0]:
                by_op: dict[str, int] = {}
                for m in ms:
                    for k, v in m["requests_by_op"].items():
                        by_op[k] = by_op.get(k, 0) + v
                shard_get = other_get = 0
                for m in ms:
                    for name, n in m["get_bytes_by_object"].items():
                        if name in files:
                            shard_get += n
                        else:
                            other_get += n
                rec.update(
                    requests=sum(by_op.values()),
                    requests_by_op=by_op,
                    gets=by_op.get("GetObject", 0),
                    get_bytes_shards=shard_get,
                    get_bytes_other=other_get,
                    get_x_ckpt=shard_get / r_payload if r_payload else None,
                    get_x_files=shard_get / r_files if r_files else None,
                )
            rounds.append(rec)
        summary: dict[str, Any] = {"seconds": _stats([r["seconds"] for r in rounds])}
        for k in ("collective_seconds_max", "pg_bytes_sent_max", "pg_bytes_sent_job", "rss_peak_max", "rss_rise_max"):
            vals = [r[k] for r in rounds if r[k] is not None]
            summary[k] = statistics.median(vals) if vals else None
        if "exact" in rounds[0]:
            summary["exact"] = all(r["exact"] for r in rounds)
            summary["compared_bytes"] = rounds[0]["compared_bytes"]
        if "requests" in rounds[0]:
            for k in ("requests", "gets", "get_bytes_shards", "get_bytes_other", "get_x_ckpt", "get_x_files"):
                summary[k] = statistics.median([r[k] for r in rounds])
            summary["requests_by_op"] = rounds[-1]["requests_by_op"]
        return {"summary": summary, "rounds": rounds}

    out: dict[str, Any] = {
        "target": job["target"],
        "mode": job["mode"],
        "world": job["world"],
        "layers": job["layers"],
        "rows": job["rows"],
        "ckpt_bytes": ckpt_bytes,
        "ckpt_files": len(first["ckpt_files"]),
        "tensor_bytes": payload,
        "local_tensor_bytes_max": max(rk["local_tensor_bytes"] for rk in ranks),
        "job_wall_seconds": wall,
        "rank_wall_seconds_max": max(rk["rank_seconds"] for rk in ranks),
        "rank_phase_seconds_max": {k: max(rk["phase_seconds"][k] for rk in ranks) for k in ranks[0]["phase_seconds"]},
        "save": per_op(lambda rd: rd["save"]),
        "restore": {
            key: per_op(lambda rd, key=key: rd["restore"][key])  # type: ignore[misc]
            for key in ranks[0]["rounds"][0]["restore"]
        },
    }
    return out


# -- report -----------------------------------------------------------------------------------------------------
def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def _size(n: Any) -> str:
    """Bytes in the unit that keeps small figures visible (B, KiB, MiB)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    if n < MiB:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MiB:,.1f} MiB"


def _rss(summary: dict[str, Any]) -> str:
    return f"{summary['rss_peak_max'] / MiB:,.0f} (+{summary['rss_rise_max'] / MiB:,.0f})"


def _sec(s: dict[str, float]) -> str:
    if s["min"] == s["max"]:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def render(doc: dict[str, Any]) -> str:
    meta, rows = doc["meta"], doc["results"]
    a = meta["args"]
    lines = [
        "# Multi-process save and restore (benchmarks/ranks.py)",
        "",
        f"`{meta['command']}` — {meta['started_utc']}, git {meta['git']}, torch {meta['torch']}, "
        f"{meta['cpus']} CPUs, load average {meta['load_avg_start'][0]:.2f} at start, "
        f"{meta['load_avg_end'][0]:.2f} at end; total {meta['total_seconds']:.0f} s.",
        "",
        f"State: {a['layers']} fp32 weights of `[{rows[0]['rows'] if rows else '?'}, {LayerStack.COLS}]` "
        f"({a['mib']} MiB) + AdamW `exp_avg`/`exp_avg_sq`/`step` after one step; {a['rounds']} rounds, medians "
        "[min-max] over rounds. Times are the slowest rank's (save: `mgr.save`; restore: `mgr.restore`, on "
        "every rank into a re-initialised model, with `io.read_once` on or off); *coll.* = time inside "
        "torch.distributed collectives during the call (slowest rank, waiting for the others included); "
        "*pg sent* = bytes the busiest rank sent over its process-group TCP connections; *RSS* = the largest "
        "rank's peak RSS during the call (rise over the RSS before it). *exact*: every rank's restored tensors "
        "equal what it saved, byte for byte, in every round and both variants.",
        "",
        "| target | mode | ranks | ckpt MiB | save s | coll. s | pg sent | RSS MiB | restore s (read once) | "
        "coll. s | pg sent | RSS MiB | restore s (direct) | RSS MiB | exact |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        s = r["save"]["summary"]
        once = r["restore"].get("true", {}).get("summary")
        direct = r["restore"].get("false", {}).get("summary")
        exact = all(x["exact"] for x in (once, direct) if x)
        cells = [r["target"], r["mode"], str(r["world"]), _mib(r["ckpt_bytes"])]
        cells += [_sec(s["seconds"]), f"{s['collective_seconds_max']:.3f}", _size(s["pg_bytes_sent_max"]), _rss(s)]
        if once:
            cells += [
                _sec(once["seconds"]),
                f"{once['collective_seconds_max']:.3f}",
                _size(once["pg_bytes_sent_max"]),
                _rss(once),
            ]
        else:
            cells += ["-"] * 4
        cells += [_sec(direct["seconds"]), _rss(direct)] if direct else ["-", "-"]
        lines.append("| " + " | ".join(cells) + f" | {exact} |")
    s3 = [r for r in rows if r["target"] == "s3"]
    if s3:
        lines += [
            "",
            "S3 (moto on 127.0.0.1) requests per job, summed over ranks: GETs and the bytes of their answers on "
            "shard files (*x ckpt* = those bytes / the checkpoint's tensor bytes: 1.0 = every stored tensor byte "
            "read once per job; shard headers are not read, the manifest has the offsets); *other* = GET bytes of "
            "other objects (manifests). *ckpt MiB*: the step's shard files. Save: every request of the save.",
            "",
            "| mode | ranks | ckpt MiB | save requests | read once: GETs | GET MiB | x ckpt | other KiB | "
            "direct: GETs | GET MiB | x ckpt | other KiB |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in s3:
            cells = [r["mode"], str(r["world"]), _mib(r["ckpt_bytes"]), f"{r['save']['summary']['requests']:.0f}"]
            for key in ("true", "false"):
                x = r["restore"].get(key, {}).get("summary")
                if x is None:
                    cells += ["-"] * 4
                    continue
                cells += [
                    f"{x['gets']:.0f}",
                    _mib(x["get_bytes_shards"]),
                    f"{x['get_x_ckpt']:.2f}",
                    f"{x['get_bytes_other'] / 1024:,.1f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


# -- driver -----------------------------------------------------------------------------------------------------
def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _bools(s: str) -> list[bool]:
    out = []
    for x in _csv(s):
        if x.lower() not in ("true", "false"):
            raise ConfigError(f"--read-once takes true/false values, got {x!r}")
        out.append(x.lower() == "true")
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"--read-once needs one or two distinct values, got {s!r}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ranks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ranks", default="1,2,4,8", help="world sizes (default 1,2,4,8)")
    ap.add_argument("--mib", type=float, default=32, help="fp32 parameter MiB (checkpoint ~3x; default 32)")
    ap.add_argument("--layers", type=int, default=8, help="weights of [rows, 1024] the MiB are split into (8)")
    ap.add_argument("--mode", default="ddp,fsdp2", help="ddp, fsdp2 or both (default)")
    ap.add_argument("--target", default="local,s3", help="local, s3 or both (default)")
    ap.add_argument("--read-once", default="true,false", help="restore variants: io.read_once values (true,false)")
    ap.add_argument("--rounds", type=int, default=3, help="saves (and restores per variant) per job (3)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the .md goes next to it")
    ap.add_argument("--dir", type=Path, help="local target base directory (default $CKPTSTORE_BENCH_DIR or bench-data)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per job before its ranks are killed")
    ap.add_argument("--corrupt-rank", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    args = ap.parse_args(argv)
    args.worlds = [int(x) for x in _csv(args.ranks)]
    args.modes = _csv(args.mode)
    args.targets = _csv(args.target)
    args.read_once_values = _bools(args.read_once)
    for m in args.modes:
        if m not in MODES:
            raise ConfigError(f"--mode {m!r}: use ddp and/or fsdp2")
    for t in args.targets:
        if t not in TARGETS:
            raise ConfigError(f"--target {t!r}: use local and/or s3")
    if not args.worlds or min(args.worlds) < 1 or args.rounds < 1 or args.layers < 1 or args.mib <= 0:
        raise ConfigError("--ranks, --rounds, --layers and --mib must be positive")
    return args


def _git() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def _targets(args: argparse.Namespace) -> Iterator[Any]:
    from .targets import DirTarget, make_target

    for name in args.targets:
        if name == "local" and args.dir is not None:
            yield DirTarget("local", args.dir)
        else:
            yield make_target(name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.ranks " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_start": list(os.getloadavg()),
    }
    if "s3" in args.targets:
        # Before any botocore session exists (the forked ranks inherit the patched class).
        from .s3util import RequestCounter

        RequestCounter.install()
        GetBytes.install()
    preload("s3" in args.targets)
    rows_per_layer = _rows(args.mib, args.layers)
    results: list[dict[str, Any]] = []
    for target in _targets(args):
        target.setup()
        try:
            for mode in args.modes:
                for world in args.worlds:
                    name = f"{mode}-{world}"
                    job = {
                        "target": target.name,
                        "mode": mode,
                        "world": world,
                        "layers": args.layers,
                        "rows": rows_per_layer,
                        "rounds": args.rounds,
                        "read_once": args.read_once_values,
                        "location": target.location(name),
                        "storage_options": target.storage_options(),
                        "s3_port": urlsplit(target.endpoint).port if target.name == "s3" else None,
                        "timeout": args.timeout,
                        "corrupt_rank": args.corrupt_rank,
                    }
                    t0 = time.perf_counter()
                    try:
                        ranks = run_job(job)
                    finally:
                        target.remove(name)
                    row = aggregate(job, ranks, time.perf_counter() - t0)
                    results.append(row)
                    s = row["save"]["summary"]["seconds"]["median"]
                    rs = {k: v["summary"]["seconds"]["median"] for k, v in row["restore"].items()}
                    print(
                        f"[ranks] {target.name} {mode} {world} ranks: save {s:.3f} s, restore "
                        + ", ".join(f"read_once={k} {v:.3f} s" for k, v in rs.items())
                        + f" ({row['job_wall_seconds']:.1f} s)",
                        flush=True,
                    )
        finally:
            target.cleanup()
    meta["load_avg_end"] = list(os.getloadavg())
    meta["total_seconds"] = time.perf_counter() - t_start
    doc = {"meta": meta, "results": results}
    md = render(doc)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return doc


if __name__ == "__main__":
    main()
