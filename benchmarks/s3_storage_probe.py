"""Probe: S3Storage writer / read_into against raw s3fs ``pipe`` / ``cat`` on a moto server over loopback.

Uploads N files of SIZE bytes in parallel and reads them back, per contender, several rounds with the order
of contenders alternating; prints GB/s (median over rounds) and the ratio against s3fs measured in the same run.

    .venv/bin/python benchmarks/s3_storage_probe.py                 # 8 x 64 MiB, moto in its own process
    .venv/bin/python benchmarks/s3_storage_probe.py --inproc        # moto in a thread of this process
    .venv/bin/python benchmarks/s3_storage_probe.py --files 4 --mib 16 --rounds 2 --json out.json

moto keeps objects above ~5 MiB in spooled temp files and reads a whole object for every ranged GET, so the
absolute numbers are moto's; the ratios compare the clients on the same server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptstore.options import IOOptions, MiB
from ckptstore.storage.s3 import S3Storage

BUCKET = "probe"
_SERVER = """
import logging, sys, time
logging.getLogger("werkzeug").setLevel(logging.WARNING)
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
srv.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(inproc: bool) -> tuple[str, Callable[[], None], Callable[[], float]]:
    """Start moto on 127.0.0.1 and an ephemeral port; returns (endpoint, stop, server_cpu_seconds)."""
    port = _free_port()
    if inproc:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        srv.start()
        return f"http://127.0.0.1:{port}", srv.stop, lambda: 0.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("moto server did not start")

    def stop() -> None:
        proc.kill()
        proc.wait()

    def cpu() -> float:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return f"http://127.0.0.1:{port}", stop, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64, help="size of one file in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part-mib", type=int, default=32)
    ap.add_argument("--read-chunk-mib", type=int, default=32)
    ap.add_argument("--inflight-mib", type=int, default=256)
    ap.add_argument("--inproc", action="store_true", help="run moto in a thread of this process")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(k, v)
    endpoint, stop, server_cpu = start_moto(args.inproc)
    try:
        results = run(endpoint, args, server_cpu)
    finally:
        stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(endpoint: str, args: argparse.Namespace, server_cpu: Callable[[], float]) -> dict[str, Any]:
    import fsspec

    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    io = IOOptions(
        part_bytes=args.part_mib * MiB,
        read_chunk_bytes=args.read_chunk_mib * MiB,
        max_inflight_bytes=args.inflight_mib * MiB,
        threads=args.files,
    )
    st = S3Storage(f"s3://{BUCKET}/ckptstore", opts, io=io)
    # Control: the same client with parts larger than the files, so every file is one PutObject. It separates
    # the cost of moto's multipart path (CompleteMultipartUpload re-reads and re-writes the whole object) from
    # the client's.
    single = S3Storage(f"s3://{BUCKET}/single", opts, io=dataclasses.replace(io, part_bytes=2 * args.mib * MiB))
    st.client.create_bucket(Bucket=BUCKET)
    fs = fsspec.filesystem("s3", **opts)
    n, size = args.files, args.mib * MiB
    total = n * size

    # Sources and destinations are allocated and touched once, outside the timed regions.
    rng = np.random.default_rng(0)
    srcs = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
    src_bytes = [s.tobytes() for s in srcs]
    dsts = [np.ones(size, dtype=np.uint8) for _ in range(n)]
    pool = ThreadPoolExecutor(n)

    def ours_write() -> None:
        def one(i: int) -> None:
            w = st.open_write(f"f{i}.bin")
            w.write([memoryview(srcs[i])])
            w.close()

        list(pool.map(one, range(n)))

    def ours_read() -> None:
        list(pool.map(lambda i: st.read_into(f"f{i}.bin", 0, [memoryview(dsts[i])]), range(n)))

    def single_put() -> None:
        def one(i: int) -> None:
            w = single.open_write(f"f{i}.bin")
            w.write([memoryview(srcs[i])])
            w.close()

        list(pool.map(one, range(n)))

    def raw_pipe() -> None:
        fs.pipe({f"{BUCKET}/raw/f{i}.bin": src_bytes[i] for i in range(n)})

    raw_out: list[Any] = []

    def raw_cat() -> None:
        raw_out.clear()
        out = fs.cat([f"{BUCKET}/raw/f{i}.bin" for i in range(n)])
        raw_out.append(out)

    contenders = {
        "upload": [("S3Storage writer", ours_write), ("s3fs pipe", raw_pipe), ("S3Storage 1-part PUT", single_put)],
        "download": [("S3Storage read_into", ours_read), ("s3fs cat", raw_cat)],
    }
    times: dict[str, list[float]] = {name: [] for pairs in contenders.values() for name, _ in pairs}
    client_cpu: dict[str, list[float]] = {name: [] for name in times}
    moto_cpu: dict[str, list[float]] = {name: [] for name in times}
    print(
        f"moto at {endpoint} ({'in-process thread' if args.inproc else 'own process'}); {n} x {args.mib} MiB; "
        f"part {args.part_mib} MiB, read chunk {args.read_chunk_mib} MiB, in flight {args.inflight_mib} MiB",
        flush=True,
    )
    for r in range(args.rounds):
        for phase in ("upload", "download"):
            pairs = contenders[phase] if r % 2 == 0 else contenders[phase][::-1]
            for name, fn in pairs:
                c0, m0, t0 = time.process_time(), server_cpu(), time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                times[name].append(dt)
                client_cpu[name].append(time.process_time() - c0)
                moto_cpu[name].append(server_cpu() - m0)
                print(
                    f"  round {r} {name:22s} {total / dt / 1e9:6.3f} GB/s  ({dt:.2f} s; CPU s: "
                    f"client {client_cpu[name][-1]:.2f}, moto {moto_cpu[name][-1]:.2f})",
                    flush=True,
                )
        if r == 0:
            for i in range(n):
                assert np.array_equal(dsts[i], srcs[i]), f"read_into mismatch in file {i}"
                assert raw_out[0][f"{BUCKET}/raw/f{i}.bin"] == src_bytes[i], f"cat mismatch in file {i}"
            for d in dsts:
                d.fill(1)
    pool.shutdown()
    st.close()
    single.close()

    summary: dict[str, Any] = {"files": n, "file_mib": args.mib, "inproc": args.inproc, "rounds": args.rounds}
    gbps = {name: total / statistics.median(ts) / 1e9 for name, ts in times.items()}
    summary["gbps_median"] = gbps
    summary["seconds"] = times
    summary["client_cpu_seconds"] = client_cpu
    summary["moto_cpu_seconds"] = moto_cpu
    up = gbps["S3Storage writer"] / gbps["s3fs pipe"]
    down = gbps["S3Storage read_into"] / gbps["s3fs cat"]
    summary["ratio_upload_vs_pipe"] = up
    summary["ratio_download_vs_cat"] = down
    print("median over rounds:")
    for name, v in gbps.items():
        cc, mc = statistics.median(client_cpu[name]), statistics.median(moto_cpu[name])
        print(f"  {name:22s} {v:6.3f} GB/s   CPU s: client {cc:.2f}, moto {mc:.2f}")
    print(f"  upload   S3Storage / s3fs pipe = {up:.2f}x")
    print(f"  download S3Storage / s3fs cat  = {down:.2f}x")
    return summary


if __name__ == "__main__":
    main()
