"""W5: asynchronous save inside a training loop (one job of ``benchmarks.run`` per contender and round).

The job builds the W5 state (the W1 layout at ``async_mib`` MiB) and trains on one thread (the other core is
left to the writer threads): micro-steps of the "training step" of ``benchmarks/bench_async.py`` (a 512x512
matmul chain, ~4 ms, standing for forward and backward) and, every ``accum`` micro-steps (``--w5-accum``,
default 25: an optimizer step every ~0.1 s, as for a model whose weights and Adam state are 1 GiB), a real
``optimizer.step()``. Then, with one :class:`~benchmarks.contenders.AsyncSession` for the whole loop
(ckptstore: one ``CheckpointManager``, staging buffers reused; DCP: ``dcp.async_save`` with one reused
``DefaultStager``):

1. the step rate alone (``--w5-rate-seconds``, default 1 s);
2. a warm-up async save, training until it completes (its blocking part is reported as the first save's:
   staging memory is allocated then);
3. a synchronous save and an asynchronous save, in an order alternating with the round, each to a new step and
   durable (fsync) when it completes, each right after an optimizer step (where training loops save). For
   the async save: ``blocking`` = time until ``save()`` returns plus,
   for ``ckptstore:overlap=true`` (``overlap_staging``), the time optimizer steps waited in ckptstore's hook
   for the staging copy (``SaveResult.staging_wait_seconds``; the excess time of the optimizer steps as timed
   here is reported too, ``opt_excess_s``, and also holds CPU contention); ``until committed`` = time until
   the background write completed, while the loop keeps training and counts its micro-steps;
4. the step rate alone again. ``step-rate dip`` = 1 - (rate while the write runs) / (mean rate alone).

Peak RSS over the baseline before the first save is the kernel's high-water mark (no sampling thread here: it
would steal CPU from the training loop being measured).

Used by ``benchmarks.worker``; run with ``python -m benchmarks.run --workloads W5``.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch

from .contenders import make_contender
from .workloads import Workload, WorkloadSpec


class Trainer:
    """A stand-in training loop: CPU-bound micro-steps (the matmul chain of ``bench_async.py``, for forward and
    backward), and every ``accum`` micro-steps an ``optimizer.step()`` (SGD on a small parameter), as with
    gradient accumulation. The optimizer step is where training waits for an overlapped staging copy
    (ckptstore ``overlap_staging``), so its time is measured: ``waited`` sums the optimizer-step seconds beyond
    what a step takes alone."""

    def __init__(self, accum: int = 25) -> None:
        self.a = torch.randn(512, 512)
        self.accum = max(1, int(accum))
        self.w = torch.nn.Parameter(torch.zeros(1024))
        self.w.grad = torch.ones(1024)
        self.opt = torch.optim.SGD([self.w], lr=1e-6)
        self.n = 0
        self.opt_alone = self._opt_step_alone()
        self.waited = 0.0

    def _opt_step_alone(self) -> float:
        ts = []
        for _ in range(50):
            t0 = time.perf_counter()
            self.opt.step()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    def step(self) -> None:
        self.a = torch.tanh(self.a @ self.a / 512)
        self.n += 1
        if self.n % self.accum == 0:
            t0 = time.perf_counter()
            self.opt.step()
            self.waited += max(0.0, time.perf_counter() - t0 - self.opt_alone)

    def to_boundary(self) -> None:
        """Train until an optimizer step was just taken: training loops save at step boundaries."""
        while self.n % self.accum:
            self.step()

    def rate(self, seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.step()
            n += 1
        return n / (time.perf_counter() - t0)

    def until_done(self, handle: Any) -> tuple[int, float]:
        """Train until ``handle`` (the async save) is done; (steps, seconds)."""
        n, t0 = 0, time.perf_counter()
        while not handle.done():
            self.step()
            n += 1
        return n, time.perf_counter() - t0


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from .worker import reset_hwm, status_kib

    spec = WorkloadSpec(**job["workload"])
    c = make_contender(job["contender"])
    c.storage_options = job.get("storage_options")
    if not c.async_ok:
        raise ValueError(f"{c.label} has no asynchronous save (W5 runs ckptstore and dcp)")
    torch.set_num_threads(1)  # one core trains, the other is left to the writer threads
    t_build = time.perf_counter()
    wl = Workload(spec, seed=0)
    t_build = time.perf_counter() - t_build
    trainer = Trainer(int(job.get("accum", 25)))
    gc.collect()
    gc.unfreeze()
    rate_seconds = float(job.get("rate_seconds", 1.0))
    rate_before = trainer.rate(rate_seconds)
    base = status_kib("VmRSS") * 1024
    hwm_ok = reset_hwm()
    sess = c.async_session(wl, job["path"])
    res: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        trainer.to_boundary()
        trainer.waited = 0.0
        h = sess.async_save(1)
        res["first_block_s"] = time.perf_counter() - t0
        trainer.until_done(h)
        out = h.wait()
        res["first_block_s"] += float(getattr(out, "staging_wait_seconds", 0.0))
        res["first_total_s"] = time.perf_counter() - t0
        order = ["sync", "async"] if job.get("round", 0) % 2 == 0 else ["async", "sync"]
        for step, kind in enumerate(order, start=2):
            trainer.to_boundary()
            t0 = time.perf_counter()
            if kind == "sync":
                sess.sync_save(step)
                res["sync_s"] = time.perf_counter() - t0
                continue
            trainer.waited = 0.0
            h = sess.async_save(step)
            res["return_s"] = time.perf_counter() - t0
            n, busy = trainer.until_done(h)
            out = h.wait()
            # Training is stalled while save() runs and, with ckptstore's overlap_staging, while an optimizer
            # step waits in its hook for the staging copy (timed around that wait by ckptstore). The excess time
            # of optimizer steps, timed here, also holds CPU contention with the writer threads: reported only.
            res["hook_wait_s"] = float(getattr(out, "staging_wait_seconds", 0.0))
            res["opt_excess_s"] = trainer.waited
            res["block_s"] = res["return_s"] + res["hook_wait_s"]
            res["total_s"] = time.perf_counter() - t0
            res["steps_during"] = n
            res["rate_during"] = n / busy if busy > 0 else None
    finally:
        sess.close()
    peak = status_kib("VmHWM") * 1024 if hwm_ok else status_kib("VmRSS") * 1024
    rate_after = trainer.rate(rate_seconds)
    alone = (rate_before + rate_after) / 2
    res.update(
        rate_alone=alone,
        rate_before=rate_before,
        rate_after=rate_after,
        # Fewer than 3 steps during the write: too short to call it a rate.
        step_rate_dip=(1 - res["rate_during"] / alone) if res["rate_during"] and res["steps_during"] >= 3 else None,
        block_over_sync=res["block_s"] / res["sync_s"],
        rss_base=base,
        rss_peak=peak,
        rss_over=max(0, peak - base),
        rss_method="VmHWM" if hwm_ok else "VmRSS after",
        build_seconds=t_build,
        pid=os.getpid(),
    )
    return res


__all__ = ["Trainer", "run_job"]
