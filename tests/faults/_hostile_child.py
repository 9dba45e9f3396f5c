"""Child for the hostile-input row: hostile safetensors headers and manifests under RLIMIT_AS.

    python _hostile_child.py ROOT   ->  one JSON line per (case, reader), then {"done": true}

The address space is limited to what the process uses after setup plus 512 MiB, so an allocation sized from
hostile input fails instead of swapping the machine. Each line records the outcome (error type, or "ok" /
"problems"), the outcomes allowed, the time taken and how far the peak RSS (VmHWM, reset before each case)
rose above the RSS the case started from.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from forge import sign, sign_body  # tests/faults/forge.py (this script's directory is on sys.path)

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointError
from ckptstore.format.manifest import MANIFEST_NAME, Manifest, step_dir
from ckptstore.format.safetensors import parse_header
from ckptstore.interop import load_external
from ckptstore.transfer import verify_step

MiB = 1 << 20


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def reset_peak() -> int:
    """Reset the peak-RSS counter (VmHWM) to the current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def main() -> None:
    root = sys.argv[1]
    mgr = CheckpointManager(root)
    state = {"w": torch.randn(1024, 256), "b": torch.randn(256)}
    mgr.save(1, state)
    m = mgr.manifest(1)
    fname = sorted(m.files)[0]
    shard = os.path.join(root, step_dir(1), fname)
    mpath = os.path.join(root, step_dir(1), MANIFEST_NAME)
    orig = open(shard, "rb").read()
    orig_manifest = open(mpath, "rb").read()
    hlen = int.from_bytes(orig[:8], "little")
    header = json.loads(orig[8 : 8 + hlen])
    # Warm every code path once (imports, thread pools) before measuring.
    verify_step(mgr.storage, 1)
    CheckpointManager(root).load(1)
    load_external(shard)

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_bytes() + 512 * MiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    def same_len(obj: dict[str, Any]) -> bytes:
        """A shard with this header and the original data section (the header keeps its length if it fits)."""
        raw = json.dumps(obj, separators=(",", ":")).encode()
        n = hlen if len(raw) <= hlen else len(raw) + (-(8 + len(raw)) % 8)
        return struct.pack("<Q", n) + raw + b" " * (n - len(raw)) + orig[8 + hlen :]

    def edit(fn: Callable[[dict[str, Any]], None]) -> bytes:
        h = json.loads(json.dumps(header))
        fn(h)
        return same_len(h)

    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[-1]
    shards = {
        "header length 2**62": struct.pack("<Q", 2**62) + orig[8:],
        "header length = whole file": struct.pack("<Q", len(orig) - 8) + orig[8:],
        "overlapping offsets": edit(lambda h: h[b].update(data_offsets=h[a]["data_offsets"])),
        "shape overflow": edit(lambda h: h[a].update(shape=[2**40, 2**40, 2**40])),
        "offsets past the end": edit(lambda h: h[a].update(data_offsets=[0, 2**63])),
        "nested JSON": orig[:8] + b"[" * hlen + orig[8 + hlen :],
    }
    rows = []

    def run(case: str, reader: str, allowed: list[str], fn: Callable[[], Any]) -> None:
        base_rss = reset_peak()  # each case's own peak, over the RSS it started from
        t0 = time.perf_counter()
        try:
            res = fn()
            outcome = "problems" if getattr(res, "ok", True) is False else "ok"
        except CheckpointError as e:
            outcome = type(e).__name__
        except BaseException as e:  # MemoryError, RecursionError, RuntimeError: each a finding
            outcome = f"untyped {type(e).__name__}: {str(e)[:200]}"
        rows.append({"case": case, "reader": reader, "outcome": outcome, "allowed": allowed,
                     "seconds": round(time.perf_counter() - t0, 3),
                     "rss_growth_mib": round((peak_rss() - base_rss) / MiB, 1)})  # fmt: skip

    for case, blob in shards.items():
        with open(shard, "wb") as f:
            f.write(blob)
        run(case, "parse_header", ["ManifestError"], lambda blob=blob: parse_header(blob, len(blob)))
        run(case, "verify_step", ["problems"], lambda: verify_step(CheckpointManager(root).storage, 1))
        # Restores read the manifest's byte ranges and check crc32c: the data is intact or the read fails.
        run(case, "load", ["ok", "IntegrityError"], lambda: CheckpointManager(root).load(1))
        run(case, "import (safetensors)", ["ManifestError"], lambda: load_external(shard))
    with open(shard, "wb") as f:
        f.write(orig)

    doc = json.loads(orig_manifest)
    body = orig_manifest[: orig_manifest.rfind(b',\n "manifest_crc32c"')]
    assert b'\n "metadata":{},' in body

    def manifest(fn: Callable[[dict[str, Any]], None]) -> bytes:
        d = json.loads(json.dumps(doc))
        fn(d)
        return sign(d)  # a valid self-checksum: the structural checks must refuse it on their own

    def claim(nbytes: int) -> Callable[[dict[str, Any]], None]:
        def fn(d: dict[str, Any]) -> None:
            t = d["tensors"]["w"]
            start = t["pieces"][0]["range"][0]
            d["files"][t["pieces"][0]["file"]] = start + nbytes + 4096
            t["shape"] = [nbytes // 4]
            t["pieces"][0]["range"] = [start, start + nbytes]

        return fn

    manifests = {
        "200k-dim shape overflow": manifest(lambda d: d["tensors"]["w"].update(shape=[2**62] * 200_000)),
        "tensor claiming 4 TiB": manifest(claim(4 << 40)),
        "tensor claiming 2 GiB": manifest(claim(2 << 30)),
        "16 MiB of junk JSON": sign_body(b"[" + b"1," * (8 * MiB) + b"1]"),
        "deeply nested manifest": sign_body(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        # 48 MiB of empty lists in one JSON field: ~22x its size as Python objects; refused by the JSON budget
        # before it is parsed.
        "48 MiB of [] in metadata": sign_body(
            body.replace(b'\n "metadata":{},', b'\n "metadata":{"x":[' + b"[]," * (16 * MiB) + b"[]]},", 1)
        ),
    }
    for case, data in manifests.items():
        with open(mpath, "wb") as f:
            f.write(data)
        # A manifest claiming a huge tensor is consistent in itself: only its files contradict it (at load).
        parse_ok = ["ok", "ManifestError"] if case.startswith("tensor claiming") else ["ManifestError"]
        run(case, "Manifest.from_bytes", parse_ok, lambda data=data: Manifest.from_bytes(data))
        # Signed, the claim reaches the reader, which finds the file too short (a typed error either way).
        load_ok = ["ManifestError", "IntegrityError"] if case.startswith("tensor claiming") else ["ManifestError"]
        run(case, "load", load_ok, lambda: CheckpointManager(root).load(1))
        run(case, "verify_step", ["problems"], lambda: verify_step(CheckpointManager(root).storage, 1))
    # A manifest larger than MAX_MANIFEST_BYTES (a sparse 2 GiB file): refused before a byte is read.
    with open(mpath, "wb") as f:
        f.truncate(2 << 30)
    run("2 GiB manifest (sparse)", "load", ["ManifestError"], lambda: CheckpointManager(root).load(1))
    with open(mpath, "wb") as f:
        f.write(orig_manifest)
    run("restored original", "load", ["ok"], lambda: CheckpointManager(root).load(1))
    for r in rows:
        print(json.dumps(r), flush=True)
    print(json.dumps({"done": True, "limit_mib": limit // MiB}), flush=True)


if __name__ == "__main__":
    main()
