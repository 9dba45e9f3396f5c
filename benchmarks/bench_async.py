"""Async save stall: the blocking part of ``save(blocking=False)`` vs a synchronous save, and the training
step-rate dip while the background write runs.

    python -m benchmarks.bench_async [--mib 1024] [--rounds 5] [--dir bench-data]

The state is ``--mib`` MiB of fp32 in 16 MiB tensors. Each round does one synchronous save and one async save
(alternating which goes first), both with fsync, to fresh steps; the async save's blocking part is the time
``save()`` takes to return (staging copy into reused buffers; the first round warms the staging pool and is
reported separately). The step rate is that of a small CPU "training step" (a 512x512 matmul chain), measured
alone and while a background write runs. Results go to ``benchmarks/results/async.md`` and ``async.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import torch

from ckptstore import CheckpointManager

RESULTS = Path(__file__).resolve().parent / "results"


def _steps_per_second(seconds: float, stop: threading.Event | None = None) -> float:
    a = torch.randn(512, 512)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and not (stop is not None and stop.is_set()):
        a = torch.tanh(a @ a / 512)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=os.environ.get("CKPTSTORE_BENCH_DIR", "bench-data"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core "trains", the other is left to the writer threads
    root = Path(args.dir) / "async"
    shutil.rmtree(root, ignore_errors=True)
    n = max(1, args.mib // 16)
    state = {f"t{i}": torch.randn(4 * 1024 * 1024) for i in range(n)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    mgr = CheckpointManager(str(root), retention={"keep_last": 2})
    step = 0
    sync_s, block_s, bg_total_s, dips = [], [], [], []
    first_block = None
    base_rate = _steps_per_second(2.0)
    for r in range(args.rounds + 1):
        order = ["sync", "async"] if r % 2 == 0 else ["async", "sync"]
        for kind in order:
            step += 1
            if kind == "sync":
                t0 = time.perf_counter()
                mgr.save(step, state)
                if r:
                    sync_s.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                pending = mgr.save(step, state, blocking=False)
                blocked = time.perf_counter() - t0
                # Train while the write runs, and measure the rate.
                done = threading.Event()
                rate: list[float] = []
                th = threading.Thread(target=lambda rate=rate, done=done: rate.append(_steps_per_second(60.0, done)))
                th.start()
                res = pending.wait()
                done.set()
                th.join()
                total = time.perf_counter() - t0
                if r == 0:
                    first_block = blocked
                else:
                    block_s.append(blocked)
                    bg_total_s.append(total)
                    dips.append(1 - rate[0] / base_rate)
                assert res.step == step
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    out = {
        "state_bytes": nbytes,
        "rounds": args.rounds,
        "sync_save_s": sync_s,
        "async_blocking_s": block_s,
        "async_blocking_first_save_s": first_block,
        "async_total_s": bg_total_s,
        "step_rate_alone": base_rate,
        "step_rate_dip": dips,
        "blocking_over_sync": med(block_s) / med(sync_s),
        "load_avg": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "async.json").write_text(json.dumps(out, indent=1))
    md = [
        f"# Async save stall ({nbytes / 2**30:.2f} GiB state, {args.rounds} rounds, load avg {os.getloadavg()[0]:.1f})",
        "",
        "| measure | median | min-max |",
        "|---|---:|---:|",
        f"| synchronous save (fsync) | {med(sync_s):.3f} s | {min(sync_s):.3f}-{max(sync_s):.3f} |",
        f"| async save, blocking part (warm staging) | {med(block_s):.3f} s | {min(block_s):.3f}-{max(block_s):.3f} |",
        f"| async save, blocking part of the first save (cold staging) | {first_block:.3f} s | |",
        f"| async save, until committed | {med(bg_total_s):.3f} s | {min(bg_total_s):.3f}-{max(bg_total_s):.3f} |",
        f"| blocking / synchronous | {out['blocking_over_sync']:.1%} | target <= 10% |",
        f"| training step-rate drop while the write runs | {med(dips):.1%} | {min(dips):.1%}-{max(dips):.1%} |",
        "",
        "Step rate: a 512x512 matmul chain on 1 thread; the drop is 1 - rate during the background write / rate alone.",
    ]
    (RESULTS / "async.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
