"""One measurement in a fresh process: build the workload, run one contender's operation, report time and RSS.

``benchmarks.run`` starts every job in a new process forked from a ``multiprocessing`` fork server that has
imported torch, ckptstore, safetensors and DCP once (a clean process without the ~1.5 s import each time).

Inside the job:

* ``save`` builds the state from seed 0; ``restore`` builds it from seed 1 (so every byte must change);
  ``load`` builds nothing;
* the baseline is VmRSS right before the operation; the peak is the kernel's VmHWM after resetting it
  (``/proc/self/clear_refs`` = 5) together with a psutil sampling thread (every 2 ms) as a cross-check;
* ``load`` includes reading every byte of the result once (crc32c) in the timed region, for every contender;
* afterwards a fingerprint (sorted per-tensor ``(nbytes, crc32c)``) of the state is returned; the runner checks
  that every restore/load reproduced what the save wrote;
* on S3 every HTTP request sent during the operation is counted by S3 operation (``benchmarks/s3util.py``);
* W4 jobs (``benchmarks/w4_dist.py``) fork 2 ranks for a save; W5 jobs (``benchmarks/w5_async.py``) run a
  training loop with synchronous and asynchronous saves.

Run the suite with ``python -m benchmarks.run``; this module has no command line of its own.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import crc32c
import psutil
import torch
import torch.distributed.checkpoint  # preloaded by the fork server
from safetensors.torch import load_file  # noqa: F401  (preloaded by the fork server)

import ckptstore  # noqa: F401  (preloaded by the fork server)

from .contenders import make_contender, tensor_view
from .workloads import W4_NAMES, Workload, WorkloadSpec


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples RSS every ``interval`` seconds in a background thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def collect_tensors(obj: Any, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every tensor in a nested dict/list/tuple structure."""
    if out is None:
        out = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            collect_tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            collect_tensors(v, out)
    return out


def fingerprint(tensors: list[torch.Tensor]) -> dict[str, Any]:
    """Order- and name-independent digest of tensor contents; reads every byte (crc32c)."""
    items = []
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        v = tensor_view(t)
        items.append((v.nbytes, crc32c.crc32c(v)))
    items.sort()
    h = hashlib.sha1(repr(items).encode()).hexdigest()[:16]
    return {"digest": h, "tensors": len(items), "nbytes": sum(n for n, _ in items)}


def request_counter(job: dict[str, Any]) -> Any:
    """The process's S3 request counter when the job writes to a URL target, else None."""
    if "://" not in job.get("path", ""):
        return None
    from .s3util import RequestCounter

    return RequestCounter.install()


def measured(fn: Callable[[], Any], counter: Any = None) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once: wall time, peak RSS over the RSS right before it, and S3 requests if ``counter``."""
    base = status_kib("VmRSS") * 1024
    hwm_ok = reset_hwm()
    if counter is not None:
        counter.reset()
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    peak = sampler.peak
    if hwm_ok:
        peak = max(peak, status_kib("VmHWM") * 1024)
    out: dict[str, Any] = {
        "seconds": seconds,
        "rss_base": base,
        "rss_peak": peak,
        "rss_over": max(0, peak - base),
        "rss_method": "VmHWM+psutil" if hwm_ok else "psutil",
    }
    if counter is not None:
        by_op = counter.snapshot()
        out["requests"] = sum(by_op.values())
        out["requests_by_op"] = by_op
    return result, out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Execute one job (see ``benchmarks.run``) and return its measurements (or ``{"error": ...}``)."""
    try:
        name = job["workload"]["name"]
        if name in W4_NAMES:
            from . import w4_dist

            return w4_dist.run_job(job)
        if name == "W5":
            from . import w5_async

            return w5_async.run_job(job)
        return _run_job(job)
    except BaseException as e:  # report every failure to the runner instead of dying silently
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    spec = WorkloadSpec(**job["workload"])
    contender = make_contender(job["contender"])
    op: str = job["op"]
    loc: str = job["path"]
    contender.storage_options = job.get("storage_options")
    counter = request_counter(job)
    t_build = time.perf_counter()
    wl = Workload(spec, seed=0 if op == "save" else 1) if op in ("save", "restore") else None
    t_build = time.perf_counter() - t_build
    contender.prepare(wl, op, loc)
    gc.collect()
    # The fork server froze the import-time objects (fast collect above); give them back to the collector so
    # automatic collections during the operation cost what they cost in a normal process.
    gc.unfreeze()

    def operation() -> Any:
        if op == "save":
            assert wl is not None
            return contender.save(wl, loc)
        if op == "restore":
            assert wl is not None
            return contender.restore(wl, loc)
        if op == "load":
            result = contender.load(loc)
            return result, fingerprint(collect_tensors(result))  # touches every byte, inside the timed region
        raise ValueError(f"unknown op {op!r}")

    result, out = measured(operation, counter)
    fp: dict[str, Any] | None = result[1] if op == "load" else None
    if wl is not None:
        fp = fingerprint(list(wl.flat().values()))
    return {**out, "build_seconds": t_build, "fingerprint": fp, "pid": os.getpid()}


def child_main(job: dict[str, Any], conn: Any) -> None:
    """Entry of the forked process: run the job, send the result through ``conn``, exit at once."""
    conn.send(run_job(job))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (tens of ms with torch loaded); nothing left to flush


# Imported once in the fork server: move everything imported so far out of the collector's way, so the
# gc.collect() before each measurement takes microseconds instead of ~0.1 s (and forked children share pages).
gc.freeze()
