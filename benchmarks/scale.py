"""Scale simulation (issue #16): the real planner, manifest encoder/decoder and restore lookup fed synthetic
Llama-3 8B / 70B state shapes (bf16 parameters, fp32 AdamW moments and a ``step`` per parameter), FSDP2 dim-0
shards or DDP replicas, at world sizes up to 8192 — in one process per case, no collectives.

    python -m benchmarks.scale                                   # the default cases (a few minutes on 2 cores)
    python -m benchmarks.scale --cases fsdp2:70b:80:8192,ddp:70b:80:2048 --impl new
    python -m benchmarks.scale --impl old --old-tree /tmp/old-scale --cases ddp:8b:2:512

A case is ``mode:model:layers:world``. Each case runs in a fresh child process (so peak RSS is the case's own)
and reports, for ``--impl new``:

* ``layout_s``: rank 0 deriving the compact layout from its own boxes (``plan.layout_from_local``; every rank
  does the same, then the ranks compare 16-byte fingerprints), and ``fingerprint_s``;
* ``plan_s``: rank-0 planning on that layout (``plan.plan_layout``) — the figure the targets talk about;
  ``plan_rss_mb``: rank 0's peak RSS over the imports, up to the end of planning; ``plan_rss_delta_mb``: the rise
  caused by building the input and planning;
* ``rank_plan_s`` / ``rank_plan_bytes``: the worst over sampled ranks of deriving one rank's plan
  (``plan.rank_plan``) and its pickled size (what a scatter would send it);
* ``gathered_plan_s``: the old protocol's input (every rank's boxes, pickled and unpickled as the gather does)
  through ``plan.plan_writes``, when ``world x tensors <= --max-gather``;
* ``pieces``, ``manifest_bytes``, ``encode_s``: the manifest the manager would commit (pieces built from every
  rank's plan with the offsets ``io.write_file`` gives them; shard headers estimated), encoded by ``to_bytes``;
  ``build_rss_mb``: the peak RSS of that (the manager holds every piece on rank 0 today);
* ``parse_s``, ``parse_rss_mb`` (rise of peak RSS over the bytes already read, in a fresh child) and
  ``parse_rss_x`` (that over the manifest's size);
* ``restore_lookup_s``: the worst over sampled ranks of finding, for every tensor, the pieces its own box needs
  (``manifest.pieces_in_box``), and ``restore_pieces``: how many it got.

``--impl old`` runs the same gathered input through the old tree's ``plan_writes`` and manifest encoder/decoder
(``--old-tree``: ``git archive`` of main). Results go to ``benchmarks/results/<name>.md`` and ``.json``
(``--merge``: only the rows of the cases run are replaced, e.g.
``--cases fsdp2:70b:80:8192 --impl new --merge``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    # hidden, intermediate, kv dim, vocab, layers
    "8b": (4096, 14336, 1024, 128256, 32),
    "70b": (8192, 28672, 1024, 128256, 80),
}
DEFAULT_CASES = [
    "ddp:8b:2:128", "ddp:8b:2:512", "ddp:8b:2:2048",
    "ddp:70b:80:512", "ddp:70b:80:2048",
    "fsdp2:8b:32:64", "fsdp2:70b:4:8192",
    "fsdp2:70b:80:512", "fsdp2:70b:80:8192",
]  # fmt: skip
DEFAULT_OLD = ["ddp:8b:2:128", "ddp:8b:2:512", "ddp:8b:2:1024", "fsdp2:70b:4:512", "fsdp2:8b:32:64"]


def param_shapes(model: str, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, kv, vocab, _ = MODELS[model]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def state_tensors(model: str, layers: int) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(key, dtype, itemsize, global shape) in state order: params (bf16), then per param AdamW step, exp_avg,
    exp_avg_sq (fp32), keyed like a flattened optimizer state dict."""
    params = param_shapes(model, layers)
    out = [(f"model/{k}", "bfloat16", 2, s) for k, s in params]
    for i, (_, s) in enumerate(params):
        out.append((f"optim/state/{i}/step", "float32", 4, ()))
        out.append((f"optim/state/{i}/exp_avg", "float32", 4, s))
        out.append((f"optim/state/{i}/exp_avg_sq", "float32", 4, s))
    return out


def local_specs(mode: str, tensors: list, rank: int, world: int) -> list:
    from ckptstore.plan import LocalSpec

    out = []
    for order, (key, dt, isz, gs) in enumerate(tensors):
        if mode == "ddp" or not gs:
            out.append(LocalSpec(key, dt, isz, gs, (0,) * len(gs), gs, order))
            continue
        c = -(-gs[0] // world)
        lo = min(rank * c, gs[0])
        rows = max(0, min(c, gs[0] - rank * c))
        out.append(LocalSpec(key, dt, isz, gs, (lo, *(0,) * (len(gs) - 1)), (rows, *gs[1:]), order))
    return out


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _samples(world: int) -> list[int]:
    return sorted({0, 1, world // 2, world - 1})


def _build_manifest(cplan_or_plan, world: int, tensors: list, new: bool):
    """The manifest the manager commits: every rank's files, pieces at the offsets write_file gives them."""
    from ckptstore.format.manifest import Manifest, Piece, TensorEntry

    sid = "9f1c2a7b"
    pieces: dict[str, list] = {t[0]: [] for t in tensors}
    files: dict[str, int] = {}
    shapes: dict[tuple, tuple] = {}
    crc = 0x9E3779B1
    for r in range(world):
        if new:
            from ckptstore.plan import rank_plan

            fps = rank_plan(cplan_or_plan, r, sid)
        else:
            fps = (
                cplan_or_plan.for_rank(r)
                if r == 0 or world <= 4096
                else [f for f in cplan_or_plan.files if f.rank == r]
            )
        for fp in fps:
            pos = 8 + sum(len(it.key) + 70 for it in fp.items) + 16
            pos += -pos % 8
            for it in fp.items:
                crc = (crc * 1103515245 + 12345) & 0xFFFFFFFF
                if it.whole:
                    p = Piece(fp.name, pos, pos + it.nbytes, crc)
                else:
                    sh = shapes.setdefault(it.shape, it.shape)
                    p = Piece(fp.name, pos, pos + it.nbytes, crc, it.offsets, sh)
                pieces[it.key].append(p)
                pos += it.nbytes
            files[fp.name] = pos
    entries = {}
    for key, dt, _, gs in tensors:
        ps = sorted(pieces[key], key=lambda p: (p.offsets or (), p.file, p.start))
        entries[key] = TensorEntry(dt, gs, tuple(ps))
    del pieces
    tree = {"t": "dict", "k": [t[0] for t in tensors], "v": [{"t": "tensor", "key": t[0]} for t in tensors]}
    return Manifest(step=1000, tree=tree, tensors=entries, files=files, world_size=world, save_id=sid)


def _build_manifest_lines(cplan, world: int, tensors: list, opts, res: dict):
    """What the protocol does with per-rank plans: every rank turns its written files into its report (files of
    compact parts as layout lines, ``CompactRows.parts_files``); rank 0 assembles the manifest from the layout
    and the reports (``save.protocol.build_manifest``). Fills the per-rank and rank-0 figures of ``res``."""
    from ckptstore.format.manifest import Piece
    from ckptstore.io import WrittenFile
    from ckptstore.plan import compact_keys, rank_plan
    from ckptstore.save import protocol
    from ckptstore.save.plans import CompactRows
    from ckptstore.save.prepare import SaveJob

    sid = "9f1c2a7b"
    rows = CompactRows.of(compact_keys(cplan.layout, opts))
    crc = 0x9E3779B1
    reports = []
    tree = {"t": "dict", "k": [t[0] for t in tensors], "v": [{"t": "tensor", "key": t[0]} for t in tensors]}
    sampled = set(_samples(world))
    worst_t = worst_b = 0.0
    report_bytes = max_b = 0
    for r in range(world):
        fps = rank_plan(cplan, r, sid)
        written = []
        for fp in fps:
            pos = 8 + sum(len(it.key) + 70 for it in fp.items) + 16
            pos += -pos % 8
            ps = []
            for it in fp.items:
                crc = (crc * 1103515245 + 12345) & 0xFFFFFFFF
                if it.whole:
                    ps.append((it.key, Piece(fp.name, pos, pos + it.nbytes, crc)))
                else:
                    ps.append((it.key, Piece(fp.name, pos, pos + it.nbytes, crc, it.offsets, it.shape)))
                pos += it.nbytes
            written.append(WrittenFile(fp.name, pos, tuple(ps)))
        t0 = time.perf_counter()
        w, parts = rows.parts_files(fps, written)
        dt = time.perf_counter() - t0
        rep = (w, None if r == 0 else [], (), parts)  # rank 0 keeps its tree; no PerRank values here
        nb = len(pickle.dumps(rep, protocol=pickle.HIGHEST_PROTOCOL))
        report_bytes += nb
        max_b = max(max_b, nb)
        if r in sampled:
            worst_t, worst_b = max(worst_t, dt), max(worst_b, nb)
        reports.append(rep)
    res["report_s"], res["report_bytes"], res["reports_total_bytes"] = worst_t, worst_b, report_bytes
    res["reports_padded_bytes"] = world * max_b  # what gather_object moves: every message padded to the largest
    job = SaveJob.new(1000, epoch=None, metrics={}, metadata={})
    job.tree = tree
    attempt = protocol.Attempt(False, 0, sid, None, True)
    spec_of = {t.key: t for t in cplan.layout.tensors}
    _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    m = protocol.build_manifest(job, spec_of, reports, attempt, world, rows)
    res["build_s"] = time.perf_counter() - t0
    res["build_rss_delta_mb"] = (_status("VmHWM") - base) / 2**20
    return m


def run_case(case: str, impl: str, max_gather: int, manifest: bool, out_dir: str) -> dict:
    mode, model, layers_s, world_s = case.split(":")
    layers, world = int(layers_s), int(world_s)
    import ckptstore.format.manifest  # noqa: F401  (imports, torch included, before the baseline)
    from ckptstore.options import IOOptions

    opts = IOOptions()
    tensors = state_tensors(model, layers)
    res: dict = {"case": case, "impl": impl, "mode": mode, "model": model, "layers": layers, "world": world,
                 "tensors": len(tensors)}  # fmt: skip
    gc_base = _status("VmRSS")
    res["baseline_rss_mb"] = gc_base / 2**20
    _reset_peak()
    if impl == "new":
        from ckptstore.plan import fingerprint, layout_from_local, plan_layout, rank_plan

        t0 = time.perf_counter()
        mine = local_specs(mode, tensors, 0, world)
        layout = layout_from_local(mine, 0, world)
        res["layout_s"] = time.perf_counter() - t0
        assert layout is not None, "every box of the synthetic state is regular"
        t0 = time.perf_counter()
        fingerprint(layout)
        res["fingerprint_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cplan = plan_layout(layout, opts)
        res["plan_s"] = time.perf_counter() - t0
        import ckptstore.plan as cp

        assert "layout_from_local" in dir(cp)
        res["plan_rss_mb"] = _status("VmHWM") / 2**20
        res["plan_rss_delta_mb"] = (_status("VmHWM") - gc_base) / 2**20
        worst_t = worst_b = 0.0
        for r in _samples(world):
            t0 = time.perf_counter()
            fps = rank_plan(cplan, r, "9f1c2a7b")
            worst_t = max(worst_t, time.perf_counter() - t0)
            worst_b = max(worst_b, len(pickle.dumps(fps, protocol=pickle.HIGHEST_PROTOCOL)))
        res["rank_plan_s"], res["rank_plan_bytes"] = worst_t, worst_b
        source = cplan
    else:
        source = None
    if world * len(tensors) <= max_gather or impl == "old":
        from ckptstore.plan import plan_writes

        blobs = [
            pickle.dumps(local_specs(mode, tensors, r, world), protocol=pickle.HIGHEST_PROTOCOL) for r in range(world)
        ]
        t0 = time.perf_counter()
        gathered = [pickle.loads(b) for b in blobs]
        res["gather_unpickle_s"] = time.perf_counter() - t0
        del blobs
        t0 = time.perf_counter()
        plan = plan_writes(gathered, save_id="9f1c2a7b", options=opts)
        res["gathered_plan_s"] = time.perf_counter() - t0
        res["gathered_plan_rss_mb"] = _status("VmHWM") / 2**20
        bcast = len(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))
        res["broadcast_plan_bytes"] = bcast  # what the current protocol sends to every rank
        del gathered
        if impl == "old":
            source = plan
        else:
            del plan
    if manifest:
        import ckptstore.format.manifest as mf

        if hasattr(mf, "GROUP_BYTES"):
            res["group_bytes"] = mf.GROUP_BYTES  # layout lines checksum groups of parts (format 2 ``k``)
        _reset_peak()
        t0 = time.perf_counter()
        if impl == "new":
            m = _build_manifest_lines(source, world, tensors, opts, res)
        else:
            m = _build_manifest(source, world, tensors, False)
            res["build_s"] = time.perf_counter() - t0
        res["pieces"] = sum(len(e.pieces) for e in m.tensors.values())
        _reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        data = m.to_bytes()
        res["encode_s"] = time.perf_counter() - t0
        res["encode_rss_delta_mb"] = (_status("VmHWM") - base) / 2**20
        res["build_rss_mb"] = _status("VmHWM") / 2**20
        res["manifest_bytes"] = len(data)
        del m
        path = Path(out_dir) / f"scale-{impl}-{case.replace(':', '-')}.json"
        path.write_bytes(data)
        del data
        res["manifest_path"] = str(path)
    return res


PARSE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from benchmarks.scale import _status, _reset_peak, _samples
from ckptstore.format.manifest import Manifest
import ckptstore.format.manifest as mf
new = hasattr(mf, "pieces_in_box")
data = open(sys.argv[1], "rb").read()
mf.MAX_MANIFEST_BYTES = max(mf.MAX_MANIFEST_BYTES, len(data))  # the old size cap would refuse the biggest ones
_reset_peak()
base = _status("VmRSS")
t0 = time.perf_counter()
m = Manifest.from_bytes(data)
parse_s = time.perf_counter() - t0
rss = _status("VmHWM") - base
world = m.world_size
worst, got = 0.0, 0
for r in _samples(world):
    t0 = time.perf_counter()
    n = 0
    for key, e in m.tensors.items():
        if not e.shape:
            ps = e.pieces
        else:
            c = -(-e.shape[0] // world) if world > 1 else e.shape[0]
            lo, rows = min(r * c, e.shape[0]), max(0, min(c, e.shape[0] - r * c))
            box = ((lo,) + (0,) * (len(e.shape) - 1), (rows,) + e.shape[1:])
            if new:
                ps = [p for p in mf.pieces_in_box(e, *box)]
            else:
                ps = e.pieces
            ps = [p for p in ps if p.offsets is None or all(
                a < b0 + s0 and b0 < a + s for a, s, b0, s0 in zip(p.offsets, p.shape, box[0], box[1]))]
        n += len(ps)
    worst = max(worst, time.perf_counter() - t0)
    got = max(got, n)
print(json.dumps({"parse_s": parse_s, "parse_rss_mb": rss / 2**20, "restore_lookup_s": worst, "restore_pieces": got}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated mode:model:layers:world")
    ap.add_argument("--old-cases", default=",".join(DEFAULT_OLD), help="cases also run with --old-tree ('' none)")
    ap.add_argument("--impl", choices=["new", "old", "both"], default="both")
    ap.add_argument("--old-tree", default="/tmp/old-scale", help="a checkout of the old code (git archive of main)")
    ap.add_argument("--max-gather", type=int, default=3_000_000, help="largest world x tensors gathered input")
    ap.add_argument("--no-manifest", action="store_true", help="skip building/encoding/parsing manifests")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--name", default="scale")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default="/tmp/ckptstore-scale")
    ap.add_argument("--merge", action="store_true", help="replace only these cases' rows in the existing results")
    a = ap.parse_args(argv)
    if a.child:
        impl, case = a.child.split("@")
        res = run_case(case, impl, a.max_gather, not a.no_manifest, a.out_dir)
        print("RESULT " + json.dumps(res))
        return
    os.makedirs(a.out_dir, exist_ok=True)
    jobs = []
    if a.impl in ("new", "both"):
        jobs += [("new", c) for c in a.cases.split(",") if c]
    if a.impl in ("old", "both") and Path(a.old_tree).is_dir():
        jobs += [("old", c) for c in (a.old_cases.split(",") if a.impl == "both" else a.cases.split(",")) if c]
    results = []
    for impl, case in jobs:
        tree = str(REPO) if impl == "new" else a.old_tree
        if impl == "old":  # the child runs from the old tree (its ckptstore first on sys.path), with this file
            (Path(tree) / "benchmarks").mkdir(exist_ok=True)
            (Path(tree) / "benchmarks" / "scale.py").write_bytes(Path(__file__).read_bytes())
        env = {**os.environ, "PYTHONPATH": tree}
        cmd = [sys.executable, "-m", "benchmarks.scale", "--child", f"{impl}@{case}", "--out-dir", a.out_dir,
               "--max-gather", str(a.max_gather)] + (["--no-manifest"] if a.no_manifest else [])  # fmt: skip
        t0 = time.perf_counter()
        try:
            # The child imports this file from the new tree (the old one has none) and ckptstore from `tree`.
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=tree, env=env)
        except subprocess.TimeoutExpired:
            res = {"case": case, "impl": impl, "error": f"timeout after {a.timeout:.0f} s"}
            results.append(res)
            print(json.dumps(res), flush=True)
            continue
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            res = {"case": case, "impl": impl, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        else:
            res = json.loads(line[-1][7:])
            res["case_wall_s"] = time.perf_counter() - t0
            mp = res.pop("manifest_path", None)
            if mp:
                pp = subprocess.run([sys.executable, "-c", PARSE_CHILD, mp, tree], capture_output=True, text=True,
                                    timeout=a.timeout, cwd=tree, env=env)  # fmt: skip
                if pp.returncode == 0:
                    res.update(json.loads(pp.stdout.strip().splitlines()[-1]))
                    res["parse_rss_x"] = res["parse_rss_mb"] * 2**20 / res["manifest_bytes"]
                else:
                    res["parse_error"] = pp.stderr.strip().splitlines()[-1:]
                os.unlink(mp)
        results.append(res)
        print(json.dumps(res), flush=True)
    out = REPO / "benchmarks" / "results"
    if a.merge and (out / f"{a.name}.json").is_file():
        new = {(r["case"], r["impl"]): r for r in results}
        old = json.loads((out / f"{a.name}.json").read_text())
        kept = [new.pop((r["case"], r["impl"]), r) for r in old]
        results = kept + list(new.values())
    (out / f"{a.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{a.name}.md").write_text(render(results))
    print(render(results))


def _f(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(results: list[dict]) -> str:
    lines = [
        "# Scale simulation (`python -m benchmarks.scale`)",
        "",
        "Synthetic Llama-3 states (bf16 params, fp32 AdamW `step`/`exp_avg`/`exp_avg_sq`), one process per case on a",
        "2-core machine. `new`: the per-rank protocol: each rank derives the compact layout from its own boxes and",
        "plans on it, reports its files of parts as layout lines; rank 0 assembles the manifest from them (`report`,",
        "`reports to rank 0` = world x the largest report, what gather_object moves; `rank-0 build`). `gathered`: the",
        "fallback's input (every rank's boxes) through `plan_writes`. `old`: main before issue #16.",
        "Manifest: what the manager would commit for that plan; parse in a fresh process (RSS rise over the bytes",
        "read). `manifest (MB)` marked `*`: layout lines checksum groups of consecutive parts (format 2 `k`, groups",
        "of at most `GROUP_BYTES`); unmarked: measured before that, one crc32c per part.",
        "",
        "| case | impl | plan rank 0 (s) | rank-0 plan RSS (MB, +rise) | gathered plan_writes (s) "
        "| plan per rank (s / KB) | broadcast plan (MB) | pieces | manifest (MB) | encode (s) | parse (s) "
        "| parse RSS (MB, x size) | restore lookup / rank (s, pieces) | report / rank (s / KB) "
        "| reports to rank 0, padded (MB) | rank-0 build (s, +MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | error: {r['error']} |" + " |" * 14)
            continue
        plan = r.get("plan_s")
        rss = f"{r['plan_rss_mb']:.0f} (+{r['plan_rss_delta_mb']:.0f})" if "plan_rss_mb" in r else "-"
        rp = f"{r['rank_plan_s']:.4f} / {r['rank_plan_bytes'] / 1024:.0f}" if "rank_plan_s" in r else "-"
        mb = r.get("manifest_bytes")
        prss = f"{r['parse_rss_mb']:.0f} ({r['parse_rss_x']:.1f}x)" if "parse_rss_mb" in r else "-"
        rl = f"{r['restore_lookup_s']:.3f}, {r['restore_pieces']}" if "restore_lookup_s" in r else "-"
        rep = f"{r['report_s']:.4f} / {r['report_bytes'] / 1024:.0f}" if "report_s" in r else "-"
        build = f"{r['build_s']:.2f}, +{r['build_rss_delta_mb']:.0f}" if "build_rss_delta_mb" in r else "-"
        star = "*" if r.get("group_bytes") else ""
        lines.append(
            f"| {r['case']} | {r['impl']} | {_f(plan, '{:.3f}')} | {rss} | {_f(r.get('gathered_plan_s'))} | {rp} | "
            f"{_f(r['broadcast_plan_bytes'] / 2**20 if 'broadcast_plan_bytes' in r else None, '{:.1f}')} | "
            f"{r.get('pieces', '-')} | {_f(mb / 2**20 if mb else None, '{:.1f}')}{star} | {_f(r.get('encode_s'))} | "
            f"{_f(r.get('parse_s'))} | {prss} | {rl} | {rep} | "
            f"{_f(r['reports_padded_bytes'] / 2**20 if 'reports_padded_bytes' in r else None, '{:.1f}')} | {build} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
