"""Manager-level S3 benchmark against a moto server on 127.0.0.1 (issue "S3 backend", performance).

    python -m benchmarks.bench_s3 [--mib 512] [--tensors 8] [--rounds 3]

Same bytes, same run, contenders alternating each round:

* raw put: ``s3fs`` ``fs.pipe`` of one object per tensor, all in parallel (the best raw parallel put);
* raw get: ``fs.cat`` of those objects in parallel;
* ckptstore: ``CheckpointManager.save`` and ``restore`` (into the existing tensors);
* DCP: ``torch.distributed.checkpoint`` with its fsspec writer/reader (4 threads) against the same bucket.

moto runs in its own process (its CPU is the bottleneck on 2 cores); results go to
``benchmarks/results/s3.md`` / ``s3.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from benchmarks.s3_storage_probe import start_moto

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(k, v)
    endpoint, stop, _ = start_moto(inproc=False)
    try:
        results = run(endpoint, args)
    finally:
        stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "s3.json").write_text(json.dumps(results, indent=1))
    med = {k: statistics.median(v) for k, v in results["seconds"].items()}
    gb = results["bytes"] / 1e9
    ratio = results["ratios"]
    lines = [
        f"# S3 on moto (127.0.0.1), {results['bytes'] / 2**20:.0f} MiB in {args.tensors} tensors, {args.rounds} rounds",
        "",
        "| contender | op | seconds (median) | GB/s |",
        "|---|---|---:|---:|",
    ]
    for k in ["raw_put", "ckptstore_save", "dcp_save", "raw_get", "ckptstore_restore", "dcp_load"]:
        op = "save" if k.endswith(("put", "save")) else "restore"
        lines.append(f"| {k.rsplit('_', 1)[0]} | {op} | {med[k]:.2f} | {gb / med[k]:.3f} |")
    lines += [
        "",
        "| ratio (per round, median [min-max]) | value | target |",
        "|---|---|---|",
        f"| ckptstore save / raw parallel put | {_fmt(ratio['save_vs_raw'])} | >= 0.9x |",
        f"| ckptstore restore / raw parallel get | {_fmt(ratio['restore_vs_raw'])} | >= 0.9x |",
        f"| ckptstore save / DCP fsspec | {_fmt(ratio['save_vs_dcp'])} | >= 2x |",
        f"| ckptstore restore / DCP fsspec | {_fmt(ratio['restore_vs_dcp'])} | >= 2x |",
        "",
        f"Load average at the end: {os.getloadavg()[0]:.1f}. Ratios are throughput ratios (time of the other / ours).",
    ]
    (RESULTS / "s3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(v: list[float]) -> str:
    return f"{statistics.median(v):.2f}x [{min(v):.2f}-{max(v):.2f}]"


def run(endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    import boto3
    import fsspec
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from ckptstore import CheckpointManager

    opts = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    bucket = "bench"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = fsspec.filesystem("s3", **opts)
    n = args.tensors
    numel = args.mib * 2**20 // 4 // n
    state = {f"t{i}": torch.randn(numel) for i in range(n)}
    blobs = {f"t{i}": t.numpy().tobytes() for i, t in enumerate(state.values())}
    nbytes = sum(len(b) for b in blobs.values())
    names = ["raw_put", "raw_get", "ckptstore_save", "ckptstore_restore", "dcp_save", "dcp_load"]
    secs: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {"save_vs_raw": [], "restore_vs_raw": [], "save_vs_dcp": [], "restore_vs_dcp": []}
    for r in range(args.rounds + 1):  # round 0 warms up (connections, staging buffers) and is not recorded
        tag = uuid.uuid4().hex[:6]
        raw_paths = {f"{bucket}/raw-{tag}/{k}": v for k, v in blobs.items()}
        mgr = CheckpointManager(f"s3://{bucket}/ck-{tag}", storage_options=opts)
        dcp_path = f"s3://{bucket}/dcp-{tag}"
        got: dict[str, float] = {}

        def raw_put(raw_paths: dict[str, bytes] = raw_paths) -> None:
            fs.pipe(raw_paths)

        def raw_get(raw_paths: dict[str, bytes] = raw_paths) -> None:
            out = fs.cat(list(raw_paths))
            assert sum(len(v) for v in out.values()) == nbytes

        def ck_save(mgr: CheckpointManager = mgr) -> None:
            mgr.save(1, state)

        def ck_restore(mgr: CheckpointManager = mgr) -> None:
            mgr.restore(state)

        def dcp_save(dcp_path: str = dcp_path) -> None:
            dcp.save(state, storage_writer=FsspecWriter(dcp_path, thread_count=4, **opts))

        def dcp_load(dcp_path: str = dcp_path) -> None:
            dcp.load(state, storage_reader=FsspecReader(dcp_path, **opts))

        saves = [("raw_put", raw_put), ("ckptstore_save", ck_save), ("dcp_save", dcp_save)]
        loads = [("raw_get", raw_get), ("ckptstore_restore", ck_restore), ("dcp_load", dcp_load)]
        rot = r % 3
        for name, fn in saves[rot:] + saves[:rot] + loads[rot:] + loads[:rot]:
            t0 = time.perf_counter()
            fn()
            got[name] = time.perf_counter() - t0
        mgr.close()
        if r == 0:
            continue
        for k, v in got.items():
            secs[k].append(v)
        ratios["save_vs_raw"].append(got["raw_put"] / got["ckptstore_save"])
        ratios["restore_vs_raw"].append(got["raw_get"] / got["ckptstore_restore"])
        ratios["save_vs_dcp"].append(got["dcp_save"] / got["ckptstore_save"])
        ratios["restore_vs_dcp"].append(got["dcp_load"] / got["ckptstore_restore"])
        print(f"round {r}: " + ", ".join(f"{k} {v:.2f}s" for k, v in got.items()), flush=True)
    return {"bytes": nbytes, "seconds": secs, "ratios": ratios, "endpoint": "moto on 127.0.0.1 (own process)"}


if __name__ == "__main__":
    main()
