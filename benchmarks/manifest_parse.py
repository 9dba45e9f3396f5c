"""Manifest parse cost: time and peak RSS of ``Manifest.from_bytes`` on large, realistic manifests.

    python -m benchmarks.manifest_parse [--sizes 16,64,256] [--kind realistic] [--chunked-every 8] [--chunks 16]

For each size (MiB) a manifest is written by ``Manifest.to_bytes`` for a transformer-like state: 12 tensors per
layer (2-D weights and 1-D biases/norms, keys like ``model/layers.17.mlp.up_proj.weight``), every
``--chunked-every``-th tensor split along dim 0 into ``--chunks`` pieces (what big tensors look like), the state
tree referring to every tensor. Each size is then parsed in a fresh child process, which reads the file, resets
its peak-RSS counter (``/proc/self/clear_refs``), parses once and reports the wall time and how far the peak RSS
(VmHWM) rose above the RSS before the parse (the input bytes already read are not counted). The parsed manifest
stays alive until the peak is read, as it would in a real reader. Linux only.

``--kind`` picks hostile shapes instead (each with a valid checksum), to measure the worst case the limits allow:
``tiny-rows`` (zero-element tensors with one-letter keys: the most rows per byte), ``tiny-pieces`` (tensors of
1000 one-element box pieces: the most pieces per byte), ``json`` (a realistic manifest whose metadata is a list
of ``[]`` sized to just fit the JSON budget: the most Python objects per byte the reader lets through).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
NAMES = [
    ("attn.q_proj.weight", (4096, 4096)),
    ("attn.k_proj.weight", (1024, 4096)),
    ("attn.v_proj.weight", (1024, 4096)),
    ("attn.o_proj.weight", (4096, 4096)),
    ("mlp.gate_proj.weight", (14336, 4096)),
    ("mlp.up_proj.weight", (14336, 4096)),
    ("mlp.down_proj.weight", (4096, 14336)),
    ("input_layernorm.weight", (4096,)),
    ("post_attention_layernorm.weight", (4096,)),
    ("attn.q_proj.bias", (4096,)),
    ("attn.k_proj.bias", (1024,)),
    ("attn.v_proj.bias", (1024,)),
]


def build(target_bytes: int, chunked_every: int, chunks: int) -> bytes:
    """A manifest of about ``target_bytes`` bytes."""
    from ckptstore.format.manifest import Manifest, Piece, TensorEntry

    def make(n_tensors: int) -> Manifest:
        tensors: dict[str, TensorEntry] = {}
        files: dict[str, int] = {}
        refs_k: list[str] = []
        refs_v: list[dict[str, str]] = []
        pos = {}
        for i in range(n_tensors):
            name, shape = NAMES[i % len(NAMES)]
            key = f"model/layers.{i // len(NAMES)}.{name}"
            fname = f"shard-9f1c2a7b-r{i % 8}-{(i // 64) % 4}.safetensors"
            start = pos.get(fname, 4096)
            pieces = []
            n_chunks = chunks if (chunked_every and i % chunked_every == 0 and shape[0] >= chunks) else 1
            rows = shape[0] // n_chunks
            for c in range(n_chunks):
                r = rows if c < n_chunks - 1 else shape[0] - rows * c
                nb = r * (shape[1] if len(shape) > 1 else 1) * 2
                box = ((c * rows, *([0] * (len(shape) - 1))), (r, *shape[1:])) if n_chunks > 1 else (None, None)
                pieces.append(Piece(fname, start, start + nb, (i * 2654435761 + c) & 0xFFFFFFFF, *box))
                start += nb
            pos[fname] = start
            files[fname] = start
            tensors[key] = TensorEntry("bfloat16", shape, tuple(pieces), "cuda:0")
            refs_k.append(key.removeprefix("model/"))
            refs_v.append({"t": "tensor", "key": key})
        tree = {"t": "dict", "k": ["model", "step"], "v": [{"t": "dict", "k": refs_k, "v": refs_v}, 1000]}
        return Manifest(step=1000, tree=tree, tensors=tensors, files=files, epoch=3, metrics={"loss": 0.5},
                        created_at=1764000000.0, save_id="9f1c2a7b",
                        versions={"ckptstore": "0.1.0", "torch": "2.13.0", "python": "3.11.7"})  # fmt: skip

    from ckptstore.errors import ManifestError

    n = max(1, int(2000 * target_bytes / len(make(2000).to_bytes())))
    while True:
        try:
            data = make(n).to_bytes()
        except ManifestError:  # over MAX_MANIFEST_BYTES (keys get longer with the layer number)
            data = b""
        if data and len(data) <= target_bytes * 1.02:
            return data
        n = int(n * 0.97)


def build_hostile(kind: str, target_bytes: int) -> bytes:
    import crc32c

    from ckptstore.format import manifest as mf
    from ckptstore.format.manifest import Manifest, Piece, TensorEntry

    def sign(body: bytes) -> bytes:
        return body + b',\n "manifest_crc32c":"' + f"{crc32c.crc32c(body):08x}".encode() + b'"\n}\n'

    def make(n: int) -> bytes:
        tensors: dict[str, TensorEntry] = {}
        for i in range(n):
            if kind == "tiny-rows":
                tensors[f"{i:x}"] = TensorEntry("uint8", (0,), (Piece("f", 0, 0, 0),))
            else:
                ps = tuple(Piece("f", j, j + 1, j, (j,), (1,)) for j in range(1000))
                tensors[f"{i:x}"] = TensorEntry("uint8", (1000,), ps)
        m = Manifest(step=1, tree={"t": "dict", "k": [], "v": []}, tensors=tensors, files={"f": 1000})
        return m.to_bytes()

    if kind == "json":
        base = build(target_bytes // 4, 8, 16)
        body = base[: base.rfind(b',\n "manifest_crc32c"')]
        # What the reader charges the other field lines, then as many "[]," as the rest of the budget allows.
        lines = [ln for ln in body.split(b"\n") if ln.startswith(b' "') and not ln.startswith(b' "tensors"')]
        other = sum(mf.json_cost(ln, ln.index(b":") + 1) for ln in lines)
        per = mf.json_cost(b"[[],[]]") - mf.json_cost(b"[[]]")  # what one more "[]," is charged
        r = mf.JSON_BUDGET_RATIO
        n = int(0.99 * (r * len(body) + mf.JSON_BUDGET_BYTES - other) / (per - 3 * r))
        line = b'\n "metadata":{"x":[' + b"[]," * n + b"[]]},"
        return sign(body.replace(b'\n "metadata":{},', line, 1))
    per_item = 110 if kind == "tiny-rows" else 60_000
    n = max(1, target_bytes // per_item)
    while True:
        try:
            data = make(n)
        except mf.ManifestError:  # over MAX_MANIFEST_BYTES
            data = b""
        if data and len(data) <= target_bytes * 1.02:
            return data
        n = int(n * 0.9)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str) -> None:
    import gc

    from ckptstore.errors import CheckpointError
    from ckptstore.format.manifest import Manifest

    Manifest.from_bytes(build(64 * 1024, 8, 16))  # warm imports and caches on a small manifest
    data = Path(path).read_bytes()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    try:
        m = Manifest.from_bytes(data)
        tensors, pieces, outcome = len(m.tensors), sum(len(t.pieces) for t in m.tensors.values()), "parsed"
    except CheckpointError as e:
        tensors, pieces, outcome = 0, 0, f"{type(e).__name__}: {str(e)[:100]}"
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    live = _status_kib("VmRSS") * 1024
    print(json.dumps({
        "bytes": len(data), "tensors": tensors, "pieces": pieces, "outcome": outcome,
        "seconds": round(seconds, 3), "peak_delta": peak - base, "live_delta": live - base,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16,64,256", help="manifest sizes in MiB, comma-separated")
    ap.add_argument("--chunked-every", type=int, default=8, help="every N-th tensor is split in --chunks pieces")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--kind", default="realistic", choices=["realistic", "tiny-rows", "tiny-pieces", "json"])
    ap.add_argument("--dir", default=None, help="where the manifests are written (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    d = Path(args.dir or tempfile.mkdtemp(prefix="manifest-parse-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"{'size':>8} {'tensors':>9} {'pieces':>9} {'parse s':>8} {'peak RSS +':>11} {'x size':>7} {'kept +':>9}")
    for size in [float(s) for s in args.sizes.split(",") if s]:
        path = d / f"manifest-{size:g}MiB.json"
        if args.kind == "realistic":
            path.write_bytes(build(int(size * MiB), args.chunked_every, args.chunks))
        else:
            path.write_bytes(build_hostile(args.kind, int(size * MiB)))
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.manifest_parse", "--child", str(path)],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            if proc.returncode != 0:
                print(f"{size:>7g}M  parse failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{r['bytes'] / MiB:>7.1f}M {r['tensors']:>9} {r['pieces']:>9} {r['seconds']:>8.2f} "
                  f"{r['peak_delta'] / MiB:>9.0f}Mi {r['peak_delta'] / r['bytes']:>6.1f}x "
                  f"{r['live_delta'] / MiB:>7.0f}Mi  {r['outcome']}", flush=True)  # fmt: skip
        finally:
            if not args.dir:
                os.unlink(path)
    if not args.dir:
        os.rmdir(d)


if __name__ == "__main__":
    main()
