"""HF export memory: peak RSS of ``ckptstore.hf.export_hf`` against the largest output shard.

    python -m benchmarks.hf_export [--model-mib 256] [--shard-mib 64] [--layers 8] [--chunk-mib 16]
                                   [--dtype bf16] [--read-batch-mib 64] [--json]

A LLaMA-shaped fp32 state of about ``--model-mib`` MiB (embedding, ``--layers`` layers of attention/MLP
projections and norms, an untied head) is saved with CheckpointManager (tensors over ``--chunk-mib`` split into
chunks), then exported in a fresh child process that resets its peak-RSS counter (``/proc/self/clear_refs``) right
before the export: the figure is how far the peak RSS (VmHWM) rose above the RSS before the export, against the
largest weights file written. Linux only. The target is about 1.2x one output shard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20

_CHILD = r"""
import json, sys, time, torch
from ckptstore import CheckpointManager
from ckptstore.hf import export_hf

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

root, out, shard, dtype, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] or None, int(sys.argv[5])
mgr = CheckpointManager(root)
mgr.manifest(mgr.latest().step)
torch.ones(4).to(torch.bfloat16)  # allocator and cast kernels (their code pages count in RSS) set up first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
res = export_hf(mgr, "latest", out, max_shard_bytes=shard, dtype=dtype, read_batch_bytes=batch)
secs = time.perf_counter() - t0
print(json.dumps({"rss_before": base, "peak_above": status("VmHWM") - base, "seconds": secs,
                  "nbytes": res.nbytes, "files": res.files}))
"""


def build_state(model_bytes: int, layers: int) -> dict[str, object]:
    """LLaMA-like shapes scaled so the fp32 state is about ``model_bytes``."""
    import math

    import torch

    # per layer: q,o: h*h; k,v: h*h/4; gate,up,down: h*2.75h; 2 norms. embed + head: 2*vocab*h, vocab = 8h.
    per_h2 = layers * (2 + 0.5 + 3 * 2.75) + 2 * 8
    h = max(64, int(math.sqrt(model_bytes / 4 / per_h2)) // 64 * 64)
    inter, vocab, kv = int(2.75 * h) // 64 * 64, 8 * h, h // 4
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(h, h)
        sd[p + "self_attn.k_proj.weight"] = w(kv, h)
        sd[p + "self_attn.v_proj.weight"] = w(kv, h)
        sd[p + "self_attn.o_proj.weight"] = w(h, h)
        sd[p + "mlp.gate_proj.weight"] = w(inter, h)
        sd[p + "mlp.up_proj.weight"] = w(inter, h)
        sd[p + "mlp.down_proj.weight"] = w(h, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    sd["model.norm.weight"] = torch.ones(h)
    sd["lm_head.weight"] = w(vocab, h)
    return {"model": sd}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mib", type=int, default=256)
    ap.add_argument("--shard-mib", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--chunk-mib", type=int, default=16, help="IOOptions.chunk_bytes of the save")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    ap.add_argument("--read-batch-mib", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from ckptstore import CheckpointManager, IOOptions

    with tempfile.TemporaryDirectory(prefix="hf-export-bench-") as tmp:
        state = build_state(args.model_mib * MiB, args.layers)
        nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())  # type: ignore[union-attr]
        largest_tensor = max(t.numel() * t.element_size() for t in state["model"].values())  # type: ignore[union-attr]
        mgr = CheckpointManager(os.path.join(tmp, "ck"), io=IOOptions(chunk_bytes=args.chunk_mib * MiB))
        t0 = time.perf_counter()
        mgr.save(1, state)
        save_s = time.perf_counter() - t0
        mgr.close()
        del state
        out = os.path.join(tmp, "out")
        p = subprocess.run(
            [sys.executable, "-c", _CHILD, os.path.join(tmp, "ck"), out, str(args.shard_mib * MiB),
             args.dtype or "", str(args.read_batch_mib * MiB)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            return 1
        r = json.loads(p.stdout.strip().splitlines()[-1])
        sizes = [os.path.getsize(os.path.join(out, f)) for f in r["files"] if f.endswith(".safetensors")]
        shard = max(sizes)
        report = {
            "model_bytes": nbytes,
            "largest_tensor_bytes": largest_tensor,
            "max_shard_bytes": args.shard_mib * MiB,
            "largest_output_file_bytes": shard,
            "files": len(sizes),
            "dtype": args.dtype or "as saved",
            "read_batch_bytes": args.read_batch_mib * MiB,
            "rss_before_export": r["rss_before"],
            "peak_rss_above_baseline": r["peak_above"],
            "ratio_to_largest_file": r["peak_above"] / shard,
            "export_seconds": r["seconds"],
            "save_seconds": save_s,
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"model {nbytes / MiB:.0f} MiB in {report['files']} files (largest {shard / MiB:.1f} MiB, largest tensor "
            f"{largest_tensor / MiB:.1f} MiB), dtype {report['dtype']}: export {r['seconds']:.2f} s, peak RSS "
            f"+{r['peak_above'] / MiB:.1f} MiB above baseline ({report['ratio_to_largest_file']:.2f}x the largest "
            "output file)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
