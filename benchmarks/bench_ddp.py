"""DDP save throughput: the same replicated state saved by 2 ranks (each writes half) vs by 1 rank.

    .venv/bin/python benchmarks/bench_ddp.py                     # 1 GiB, 5 rounds, in a temp dir under /tmp
    .venv/bin/python benchmarks/bench_ddp.py --mib 256 --runs 3 --dir /mnt/nvme/tmp --json out.json

Method:

* the script starts 2 real ranks itself (``spawn``, gloo on CPU, rendezvous store hosted by this process); each
  rank builds the same ``--mib`` MiB state (``--tensor-mib`` MiB float32 tensors, random data), as DDP ranks
  hold the same replicated model/optimizer;
* contender ``2 ranks``: both ranks call ``mgr.save`` (the planner gives each half the bytes, written once);
  contender ``1 rank``: rank 0 alone saves the same state with a single-process manager while rank 1 waits;
  both run in the same processes on the same memory, so only the number of writers differs;
* every file is fsynced (ckptstore fsyncs each shard file and the step directory, then commits the manifest);
  the step is deleted after each measurement so every save allocates new blocks;
* timing: from a barrier to the return of ``save`` on rank 0 (for 2 ranks that is after both ranks wrote and
  fsynced, rank 0 committed and broadcast the outcome); the contender order alternates every round; one
  unrecorded warm-up round; medians over ``--runs`` rounds, the ratio is computed per round and its median
  reported; GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rank_main(rank: int, world: int, port: int, args: dict[str, Any], out_path: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from ckptstore import CheckpointManager
    from ckptstore.dist import LocalComm

    timeout = _dt.timedelta(seconds=600)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    # The same state on every rank (DDP replicas): seeded random data, not zeros (no sparse-file shortcuts).
    g = torch.Generator().manual_seed(0)
    per = args["tensor_mib"] << 20
    n = (args["mib"] << 20) // per
    state = {f"layer{i}.weight": torch.randn(per // 4, generator=g) for i in range(n)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    base = Path(args["dir"])
    two = CheckpointManager(base / "two", io={"timeout_seconds": 600})
    one = CheckpointManager(base / "one", comm=LocalComm()) if rank == 0 else None

    def run(contender: str, step: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if contender == "2 ranks":
            two.save(step, state)
        elif rank == 0:
            assert one is not None
            one.save(step, state)
        dt = time.perf_counter() - t0
        dist.barrier()
        return dt

    results: dict[str, list[float]] = {"1 rank": [], "2 ranks": []}
    per_rank: list[int] = []
    for r in range(args["runs"] + 1):  # round 0: warm-up, not recorded
        order = ["1 rank", "2 ranks"] if r % 2 == 0 else ["2 ranks", "1 rank"]
        for c in order:
            step = r + 1
            dt = run(c, step)
            if rank == 0:
                if c == "2 ranks" and not per_rank:
                    m = two.manifest(step)
                    per_rank = [0] * world
                    for e in m.tensors.values():
                        for p in e.pieces:
                            per_rank[int(p.file.split("-r")[1].split("-")[0])] += p.nbytes
                mgr = two if c == "2 ranks" else one
                assert mgr is not None
                mgr.delete(step)
                if r > 0:
                    results[c].append(dt)
            dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"nbytes": nbytes, "seconds": results, "bytes_per_rank": per_rank}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="state size in MiB (default 1024 = 1 GiB)")
    ap.add_argument("--tensor-mib", type=int, default=16, help="size of each tensor in MiB (default 16)")
    ap.add_argument("--runs", type=int, default=5, help="recorded rounds per contender (default 5)")
    ap.add_argument("--dir", help="directory to write under (default: a temp dir under /tmp, removed after)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.mib < args.tensor_mib:
        ap.error("--mib must be at least --tensor-mib")

    import torch.distributed as dist

    work = Path(tempfile.mkdtemp(prefix="bench_ddp-", dir=args.dir))
    out_path = str(work / "result.json")
    world = 2
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    conf = {"mib": args.mib, "tensor_mib": args.tensor_mib, "runs": args.runs, "dir": str(work / "ckpt")}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, conf, out_path)) for r in range(world)]
    t0 = time.perf_counter()
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        with open(out_path) as f:
            res = json.load(f)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    nbytes = res["nbytes"]
    one, two = res["seconds"]["1 rank"], res["seconds"]["2 ranks"]
    ratios = [a / b for a, b in zip(one, two)]
    report = {
        "state_bytes": nbytes,
        "tensor_mib": args.tensor_mib,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "bytes_per_rank_2": res["bytes_per_rank"],
        "1 rank": {"median_s": statistics.median(one), "gb_s": nbytes / 1e9 / statistics.median(one), "all_s": one},
        "2 ranks": {"median_s": statistics.median(two), "gb_s": nbytes / 1e9 / statistics.median(two), "all_s": two},
        "speedup_median": statistics.median(ratios),
    }
    print(
        f"DDP save, {nbytes / 2**30:.2f} GiB state ({nbytes // (args.tensor_mib << 20)} x {args.tensor_mib} MiB), "
        f"fsync included, {args.runs} rounds (+1 warm-up), {time.perf_counter() - t0:.0f}s total"
    )
    for c in ("1 rank", "2 ranks"):
        r = report[c]
        runs = ", ".join(f"{s:.2f}" for s in r["all_s"])
        print(f"  {c:8s} median {r['median_s']:.2f}s  {r['gb_s']:.2f} GB/s   (runs: {runs})")
    print(f"  2-rank bytes per rank: {report['bytes_per_rank_2']}")
    print(f"  speedup 2 vs 1 rank (median of per-round ratios): {report['speedup_median']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
