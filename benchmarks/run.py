"""Run the ckptstore benchmark suite and write ``benchmarks/results/<name>.{md,json,png}``.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run                       # W1-W5 on local, shm and s3 (moto), 5 rounds
    .venv/bin/python -m benchmarks.run --quick               # small sizes, 3 rounds -> quick.*
    .venv/bin/python -m benchmarks.run --workloads W1,W2 --target local --repeats 7
    .venv/bin/python -m benchmarks.run --workloads W1 --contenders raw,torch,ckptstore,ckptstore:threads=2
    .venv/bin/python -m benchmarks.run --workloads W1 --read-cache both   # also cold reads (see below)
    .venv/bin/python -m benchmarks.run --workloads W1,W2 --target s3 --size-mib 512    # moto S3 only
    .venv/bin/python -m benchmarks.run --workloads W4,W5 --target local --w4-mib 128 --w5-mib 512

Method:

* every measurement runs in a fresh process (forked from a fork server that has imported torch once); the
  process builds the state, runs one operation, and reports its time and its peak RSS over the baseline;
* contenders alternate: in round ``r`` the contender order is rotated by ``r``; within a round all saves run
  back to back, then all restores, then all loads (each contender reads its own files; deleted at the end of the
  round; if they would not fit in ``--max-live-gib``, each contender runs save+reads in turn instead); one
  unrecorded warm-up (raw save + load) precedes the rounds;
* every contender fsyncs every file it writes (and the directory);
* throughput is checkpoint payload bytes (sum of tensor bytes, the same for every contender) / wall time, GB/s
  with GB = 1e9 bytes; medians over the rounds with min-max; ratios are computed per round (same round, so the
  same machine state) and their median is reported;
* reads are "warm" by default: the files were just written, so their pages are in the page cache. Dropping the
  machine's caches would disturb other users, so ``--read-cache cold`` instead evicts only this benchmark's
  files (``posix_fadvise(DONTNEED)`` after the fsync; not possible on tmpfs);
* every restore/load is checked against the saved state (crc32c fingerprint of all tensors);
* on S3 (a moto server in its own process on 127.0.0.1) the HTTP requests of every operation are counted
  (botocore ``before-send`` events, in the measuring process) and the moto process's CPU seconds recorded;
* W4 (2-rank DDP/FSDP2 save, 1-rank restore; ``w4_dist.py``) follows the same rounds with the contenders that
  save from several ranks (ckptstore, dcp); W5 (async save in a training loop; ``w5_async.py``) runs one job per
  contender and round, each doing a synchronous and an asynchronous save.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .contenders import DEFAULT_CONTENDERS, Contender, make_contender
from .targets import Target, make_target
from .workloads import W4_NAMES, WorkloadSpec, human_bytes, tensor_count, tensor_nbytes

WORKLOADS = ("W1", "W2", "W3", *W4_NAMES, "W5")
W4_OPS = {"save": "save (2 ranks)", "restore": "restore (1 rank)"}

RESULTS = Path(__file__).resolve().parent / "results"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (~10 minutes with all targets)")
    ap.add_argument(
        "--workloads",
        default="W1,W2,W3,W4,W5",
        help="comma list of W1 (large), W2 (small), W3 (GPT-2+AdamW), W4 (= W4-DDP,W4-FSDP2: 2-rank save, 1-rank "
        "restore), W5 (async save in a training loop)",
    )
    ap.add_argument("--target", default="local,shm,s3", help="comma list of local, shm, s3 (moto on 127.0.0.1)")
    ap.add_argument("--size-mib", type=int, default=None, help="W1 size in MiB (default 1024, quick 128)")
    ap.add_argument("--tensor-mib", type=int, default=16, help="tensor size in MiB of W1, W4 and W5 (default 16)")
    ap.add_argument("--small-count", type=int, default=None, help="W2 tensor count (default 10000, quick 1000)")
    ap.add_argument("--small-kib", type=int, default=16, help="W2 tensor size in KiB (default 16)")
    ap.add_argument("--gpt", default=None, choices=["small", "tiny"], help="W3 model (default small, quick tiny)")
    ap.add_argument(
        "--w4-mib", type=int, default=None, help="W4 parameter MiB; + AdamW state = 3x (default 256, quick 32)"
    )
    ap.add_argument("--w5-mib", type=int, default=None, help="W5 state MiB (default 1024, quick 128)")
    ap.add_argument(
        "--w5-accum",
        type=int,
        default=25,
        help="W5: micro-steps (~4 ms each) per optimizer step, as with gradient accumulation (default 25)",
    )
    ap.add_argument(
        "--w5-rate-seconds", type=float, default=1.0, help="W5: seconds to measure the step rate alone, before+after"
    )
    ap.add_argument("--repeats", type=int, default=None, help="rounds per workload and target (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded raw save+load warm-ups per workload (1)")
    ap.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help="comma list; options after ':' e.g. ckptstore:threads=2:chunk_bytes=33554432",
    )
    ap.add_argument(
        "--max-live-gib",
        type=float,
        default=6.0,
        help="group each round by operation (all saves, then all reads) when the contenders' files fit in this "
        "many GiB, else run each contender's save+reads in turn (default 6)",
    )
    ap.add_argument("--read-cache", default="warm", choices=["warm", "cold", "both"], help="page cache for reads")
    ap.add_argument("--name", default=None, help="output name in benchmarks/results (default latest, quick: quick)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement before it is killed")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.size_mib = args.size_mib or (128 if args.quick else 1024)
    args.small_count = args.small_count or (1000 if args.quick else 10_000)
    args.gpt = args.gpt or ("tiny" if args.quick else "small")
    args.w4_mib = args.w4_mib or (32 if args.quick else 256)
    args.w5_mib = args.w5_mib or (128 if args.quick else 1024)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.name = args.name or ("quick" if args.quick else "latest")
    return args


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["benchmarks.worker"])
        self.records: list[dict[str, Any]] = []
        self.expected: dict[tuple[str, str], dict[str, Any]] = {}
        self.problems: list[str] = []

    # -- one measurement -----------------------------------------------------------------------------------
    def job(self, job: dict[str, Any]) -> dict[str, Any]:
        from . import worker

        parent, child = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=worker.child_main, args=(job, child), name="ckpt-bench-job")
        p.start()
        child.close()
        res: dict[str, Any]
        try:
            if parent.poll(self.args.timeout):
                res = parent.recv()
            else:
                res = {"error": f"timed out after {self.args.timeout:.0f}s"}
        except EOFError:
            res = {"error": "the measuring process died without a result"}
        parent.close()
        p.join(60 if "error" not in res else 0.1)
        if p.is_alive():  # our own child, by its handle
            p.kill()
            p.join()
        if p.exitcode not in (0, None) and "error" not in res:
            res["error"] = f"exit code {p.exitcode}"
        return res

    @staticmethod
    def prewarm(path: Path) -> None:
        """Read our files once so a "warm" read really finds them in the page cache.

        Just-written pages are not guaranteed to stay cached: memory reclaim (e.g. DAMON pageout in VMs) may
        write back and drop them seconds later, which would make some "warm" reads partly cold.
        """
        buf = bytearray(8 << 20)
        for d, _, files in os.walk(path):
            for fn in files:
                with open(os.path.join(d, fn), "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass

    @staticmethod
    def evict(path: Path) -> None:
        """Drop the clean page-cache pages of our own files (not the machine's caches)."""
        for d, _, files in os.walk(path):
            for fn in files:
                fd = os.open(os.path.join(d, fn), os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self, targets: list[Target], specs: list[WorkloadSpec], contenders: list[Contender]) -> None:
        for target in targets:
            target.setup()
            try:
                for spec in specs:
                    self.run_workload(target, spec, contenders)
            finally:
                target.cleanup()

    def run_workload(self, target: Target, spec: WorkloadSpec, contenders: list[Contender]) -> None:
        a = self.args
        if spec.name in W4_NAMES:
            usable = [c for c in contenders if c.dist_ok]
        elif spec.name == "W5":
            usable = [c for c in contenders if c.async_ok]
            labels = {c.label for c in usable}
            if "ckptstore" in labels and a.contenders == ",".join(DEFAULT_CONTENDERS):
                # By default W5 also measures overlap_staging (only async saves differ with it).
                usable.append(make_contender("ckptstore:overlap=true"))
        else:
            usable = [c for c in contenders if target.is_fs or not c.fs_only]
        nbytes = tensor_nbytes(spec)
        print(f"\n== {target.name} | {spec.describe()} | {human_bytes(nbytes)} | {a.repeats} rounds", flush=True)
        if not usable:
            print("   (no contender for this workload)", flush=True)
            return
        if spec.name == "W5":
            self.run_async(target, spec, usable)
            return
        # Unrecorded warm-up (page cache, allocator; on S3 moto's lazily loaded code paths). W4 needs none: its
        # ranks are fresh processes in every measurement anyway.
        for i in range(a.warmup if spec.name not in W4_NAMES else 0):
            loc = target.location(f"{spec.name}-warmup-{i}")
            for op in ("save", "load"):
                self.job(self.job_dict(target, spec, "raw", op, loc))
            target.remove(f"{spec.name}-warmup-{i}")
        reads = {"warm": ["warm"], "cold": ["cold"], "both": ["warm", "cold"]}[a.read_cache]
        if not target.evictable:
            reads = ["warm"]
        savers = [c for c in usable if not self.borrows(c, usable)]
        grouped = len([c for c in savers if set(c.ops) - {"save"}]) * nbytes <= a.max_live_gib * 2**30
        t_start = time.perf_counter()
        for r in range(a.repeats):
            k = r % len(usable)
            order = usable[k:] + usable[:k]
            if grouped:
                self.round_by_op(target, spec, order, r, reads)
            else:
                for c in order:
                    self.round_by_op(target, spec, [c], r, reads)
            el = time.perf_counter() - t_start
            print(f"   round {r + 1}/{a.repeats} done, {el:.0f}s elapsed", flush=True)

    def job_dict(self, target: Target, spec: WorkloadSpec, contender: str, op: str, loc: str) -> dict[str, Any]:
        return {
            "workload": spec.to_dict(),
            "contender": contender,
            "op": op,
            "path": loc,
            "storage_options": target.storage_options(),
            # W4 ranks give up (and report) before the runner kills their job process.
            "timeout": max(10.0, self.args.timeout - 30),
        }

    def run_async(self, target: Target, spec: WorkloadSpec, usable: list[Contender]) -> None:
        """W5: per round, one job per contender (order rotated); each job records three operations."""
        a = self.args
        t_start = time.perf_counter()
        for r in range(a.repeats):
            k = r % len(usable)
            for c in usable[k:] + usable[:k]:
                name = f"{spec.name}-{c.label.replace(':', '_').replace('=', '')}-r{r}"
                job = self.job_dict(target, spec, c.label, "async", target.location(name))
                job.update(round=r, rate_seconds=a.w5_rate_seconds, accum=a.w5_accum)
                try:
                    res = self.job(job)
                finally:
                    target.remove(name)
                self.record_async(target, spec, c, r, res)
            el = time.perf_counter() - t_start
            print(f"   round {r + 1}/{a.repeats} done, {el:.0f}s elapsed", flush=True)

    def report_problem(self, msg: str, res: dict[str, Any]) -> None:
        self.problems.append(msg)
        print(f"   !! {msg}", flush=True)
        if res.get("traceback"):
            print(res["traceback"], file=sys.stderr, flush=True)

    def record_async(self, target: Target, spec: WorkloadSpec, c: Contender, rnd: int, res: dict[str, Any]) -> None:
        nbytes = tensor_nbytes(spec)
        common = {"target": target.name, "workload": spec.name, "contender": c.label, "round": rnd, "nbytes": nbytes}
        if "error" in res:
            self.report_problem(f"{target.name} {spec.name} {c.label} async round {rnd}: {res['error']}", res)
            self.records.append({**common, "op": "async: blocking", "error": res["error"]})
            return
        rss = {k: res[k] for k in ("rss_base", "rss_peak", "rss_over", "rss_method")}
        extras = {
            k: res.get(k)
            for k in (
                "block_over_sync",
                "step_rate_dip",
                "first_block_s",
                "rate_alone",
                "rate_during",
                "steps_during",
                "return_s",
                "hook_wait_s",
                "opt_excess_s",
            )
        }
        for op, key, extra in (
            ("save (sync)", "sync_s", {}),
            ("async: blocking", "block_s", extras),
            ("async: until committed", "total_s", {}),
        ):
            sec = res[key]
            self.records.append({**common, "op": op, "seconds": sec, "gbps": nbytes / sec / 1e9, **rss, **extra})
        dip = res.get("step_rate_dip")
        print(
            f"   r{rnd} {c.label:<24} sync {res['sync_s']:.3f}s  async blocking {res['block_s']:.3f}s "
            f"(save() {res['return_s']:.3f}s + hooks waited {res['hook_wait_s']:.3f}s; optimizer steps "
            f"{res['opt_excess_s']:.3f}s slower) "
            f"({res['block_over_sync']:.1%} of sync; first save {res['first_block_s']:.3f}s)  "
            f"until committed {res['total_s']:.3f}s  step-rate dip {'n/a' if dip is None else f'{dip:.1%}'}  "
            f"rss +{res['rss_over'] / 2**20:.0f} MiB",
            flush=True,
        )

    @staticmethod
    def borrows(c: Contender, group: list[Contender]) -> Contender | None:
        """The contender whose files ``c`` reads (torch-mmap reads torch.save files), if it is in ``group``."""
        if c.files_of is None:
            return None
        return next((o for o in group if o.kind == c.files_of and o.label == o.kind), None)

    def round_by_op(
        self, target: Target, spec: WorkloadSpec, order: list[Contender], rnd: int, reads: list[str]
    ) -> None:
        """All saves of ``order`` back to back, then all restores, then all loads (ratios pair up closely)."""
        locs: dict[str, str] = {}
        names: list[str] = []
        read_ops = ("restore",) if spec.name in W4_NAMES else ("restore", "load")
        try:
            for c in order:
                if self.borrows(c, order) is not None:
                    continue
                name = f"{spec.name}-{c.label.replace(':', '_').replace('=', '')}-r{rnd}"
                names.append(name)
                if self.measure(target, spec, c, "save", rnd, target.location(name), record="save" in c.ops):
                    if set(c.ops) & set(read_ops):
                        locs[c.label] = target.location(name)
                    else:
                        target.remove(name)
            for cache in reads:
                for op in read_ops:
                    for c in order:
                        src = self.borrows(c, order) or c
                        if op not in c.ops or src.label not in locs:
                            continue
                        if cache == "cold":
                            self.evict(Path(locs[src.label]))
                        elif target.is_fs:
                            self.prewarm(Path(locs[src.label]))
                        self.measure(target, spec, c, op, rnd, locs[src.label], cache=cache)
        finally:
            for name in names:
                target.remove(name)

    def measure(
        self,
        target: Target,
        spec: WorkloadSpec,
        c: Contender,
        op: str,
        rnd: int,
        loc: str,
        *,
        record: bool = True,
        cache: str = "warm",
    ) -> bool:
        cpu0 = target.server_cpu()
        res = self.job(self.job_dict(target, spec, c.label, op, loc))
        cpu1 = target.server_cpu()
        nbytes = tensor_nbytes(spec)
        label = W4_OPS[op] if spec.name in W4_NAMES else op
        rec: dict[str, Any] = {
            "target": target.name,
            "workload": spec.name,
            "contender": c.label,
            "op": label if cache == "warm" else f"{label} (cold)",
            "round": rnd,
            "nbytes": nbytes,
            **{k: v for k, v in res.items() if k != "traceback"},
        }
        if cpu0 is not None and cpu1 is not None:
            # The whole job (process start, building the state, the operation); the server is idle otherwise.
            rec["server_cpu_s"] = cpu1 - cpu0
        key = (target.name, spec.name)
        fp = res.get("fingerprint")
        if "error" not in res and fp is not None:
            if op == "save":
                exp = self.expected.setdefault(key, fp)
                if fp["digest"] != exp["digest"]:
                    rec["error"] = "save fingerprint differs between processes (non-deterministic workload?)"
            elif key in self.expected and fp["digest"] != self.expected[key]["digest"]:
                rec["error"] = f"{op} produced different data than was saved ({fp} != {self.expected[key]})"
        if op == "save" and "error" not in res:
            sizes = target.files(loc)
            rec["files"] = len(sizes)
            rec["disk_bytes"] = sum(sizes)
        if "error" in rec:
            self.report_problem(f"{target.name} {spec.name} {c.label} {rec['op']} round {rnd}: {rec['error']}", res)
        else:
            rec["gbps"] = nbytes / res["seconds"] / 1e9
            if record:
                reqs = f"  {rec['requests']} requests" if "requests" in rec else ""
                print(
                    f"   r{rnd} {c.label:<24} {rec['op']:<17} {rec['gbps']:7.2f} GB/s {res['seconds']:7.3f}s  "
                    f"rss +{rec['rss_over'] / 2**20:7.1f} MiB{reqs}",
                    flush=True,
                )
        if record:
            self.records.append(rec)
        return "error" not in rec


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    specs: list[WorkloadSpec] = []
    names: list[str] = []
    for w in filter(None, (x.strip() for x in args.workloads.upper().split(","))):
        for n in W4_NAMES if w == "W4" else (w,):
            if n not in WORKLOADS:
                raise SystemExit(f"unknown workload {w!r} ({', '.join(('W1', 'W2', 'W3', 'W4', *W4_NAMES, 'W5'))})")
            if n not in names:
                names.append(n)
    for n in names:
        specs.append(
            WorkloadSpec(
                n,
                size_mib=args.size_mib,
                tensor_mib=args.tensor_mib,
                n_small=args.small_count,
                small_kib=args.small_kib,
                gpt=args.gpt,
                dist_mib=args.w4_mib,
                async_mib=args.w5_mib,
            )
        )
    contenders = [make_contender(c.strip()) for c in args.contenders.split(",") if c.strip()]
    targets = [make_target(t.strip()) for t in args.target.split(",") if t.strip()]
    machine = report.machine_info(targets)
    print(report.machine_line(machine), flush=True)
    for s in specs:
        print(f"  {s.describe()}: {human_bytes(tensor_nbytes(s))} in {tensor_count(s):,} tensors")
    runner = Runner(args)
    t0 = time.time()
    try:
        runner.run(targets, specs, contenders)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured so far", file=sys.stderr)
    machine["load_avg_end"] = list(os.getloadavg())
    machine["targets"] = {t.name: t.info() for t in targets}  # after setup: e.g. the S3 endpoint
    meta = {
        "command": " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "started_at": t0,
        "seconds": time.time() - t0,
        "workloads": {s.name: {**s.to_dict(), "describe": s.describe(), "nbytes": tensor_nbytes(s)} for s in specs},
        "contenders": [c.label for c in contenders],
        "problems": runner.problems,
    }
    paths = report.write_all(args.out_dir, args.name, machine, meta, runner.records, plot=not args.no_plot)
    print("\n" + paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if runner.problems else 0


if __name__ == "__main__":
    sys.exit(main())
