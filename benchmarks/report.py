"""Summaries, target checks and outputs (markdown, JSON, PNG) of a benchmark run.

Written by ``python -m benchmarks.run`` to ``benchmarks/results/<name>.md``, ``<name>.json`` and
``<name>.png``. Re-render from a JSON file with ``python -m benchmarks.report benchmarks/results/latest.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .targets import REPO, Target

MiB = 1 << 20
OPS_ORDER = ("save", "restore", "load", "restore (cold)", "load (cold)")


# -- machine ----------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(targets: Iterable[Target]) -> dict[str, Any]:
    import psutil
    import safetensors
    import torch

    import ckptstore

    return {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": safetensors.__version__,
        "ckptstore": ckptstore.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "ckptstore")),
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "load_avg_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "targets": {t.name: t.info() for t in targets},
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}, safetensors {m['safetensors']}, ckptstore {m['ckptstore']} "
        f"(git {m['git_commit']}{' + local changes' if m['git_dirty'] else ''})"
    )


# -- statistics -------------------------------------------------------------------------------------------------
def _stats(xs: Sequence[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _paired(mine: dict[int, float], other: Sequence[dict[str, Any]], *, invert: bool) -> dict[str, float] | None:
    """Per-round ratio mine/other (or other/mine), over the rounds both have."""
    o = {x["round"]: x["gbps"] for x in other}
    common = sorted(set(mine) & set(o))
    if not common:
        return None
    return _stats([(o[k] / mine[k]) if invert else (mine[k] / o[k]) for k in common])


def reference_contender(records: Sequence[dict[str, Any]]) -> str | None:
    labels = {r["contender"] for r in records}
    if "ckptstore" in labels:
        return "ckptstore"
    cands = sorted(x for x in labels if x.startswith("ckptstore"))
    return cands[0] if cands else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, workload, contender, op) with medians, ranges and paired ratios."""
    ok = [r for r in records if "error" not in r and "gbps" in r]
    ref = reference_contender(ok)
    by: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in ok:
        by.setdefault((r["target"], r["workload"], r["contender"], r["op"]), []).append(r)
    order: list[str] = []
    for r in records:
        if r["contender"] not in order:
            order.append(r["contender"])
    rows = []
    for (tgt, wl, c, op), rs in by.items():
        per_round = {x["round"]: x["gbps"] for x in rs}
        nbytes = rs[0]["nbytes"]
        rss = [x["rss_over"] for x in rs]
        files = [x["files"] for x in rs if "files" in x]
        rows.append(
            {
                "target": tgt,
                "workload": wl,
                "contender": c,
                "op": op,
                "nbytes": nbytes,
                "gbps": _stats([x["gbps"] for x in rs]),
                "seconds": _stats([x["seconds"] for x in rs]),
                "vs_raw": _paired(per_round, by.get((tgt, wl, "raw", op), []), invert=False) if c != "raw" else None,
                "ref_over_this": _paired(per_round, by.get((tgt, wl, ref, op), []), invert=True)
                if ref and c != ref
                else None,
                "rss_over_mib": _stats([x / MiB for x in rss]),
                "rss_over_frac": _stats([x / nbytes for x in rss]),
                "files": statistics.median(files) if files else None,
                "disk_bytes": statistics.median([x["disk_bytes"] for x in rs if "disk_bytes" in x]) if files else None,
            }
        )
    rows.sort(
        key=lambda r: (
            r["target"],
            r["workload"],
            OPS_ORDER.index(r["op"]) if r["op"] in OPS_ORDER else 99,
            order.index(r["contender"]),
        )
    )
    return rows


# -- targets of the issue "Core" -------------------------------------------------------------------------------
def check_targets(rows: Sequence[dict[str, Any]], workloads: dict[str, Any]) -> list[dict[str, Any]]:
    ref = reference_contender([{"contender": r["contender"]} for r in rows])
    out: list[dict[str, Any]] = []
    if ref is None:
        return out
    idx = {(r["target"], r["workload"], r["contender"], r["op"]): r for r in rows}
    for tgt in sorted({r["target"] for r in rows}):
        for wl, op, other, need, what in (
            ("W1", "save", "raw", 1.0, "save >= 1.0x raw single-stream write+fsync"),
            ("W1", "save", "torch", 1.5, "save >= 1.5x torch.save + fsync"),
            ("W1", "restore", "torch", 4.0, "restore into existing >= 4x torch.load + load_state_dict"),
            ("W1", "save", None, 0.0, ""),
            ("W1", "restore", None, 0.0, ""),
            ("W2", "save", "torch", 1.0, "10k small tensors: save >= torch.save"),
            ("W2", "load", "torch", 1.0, "10k small tensors: load >= torch.load"),
        ):
            if other is not None:
                o = idx.get((tgt, wl, other, op))
                s = o["ref_over_this"] if o is not None else None
                if s is None:
                    continue
                value, need_v, met = s["median"], need, s["median"] >= need
                measured = f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"
            else:
                r = idx.get((tgt, wl, ref, op))
                if r is None or r["rss_over_mib"] is None:
                    continue
                need_v = 0.10 * r["nbytes"] / MiB + 100
                value = r["rss_over_mib"]["max"]
                met = value <= need_v
                measured = f"{r['rss_over_mib']['median']:.1f} MiB median, {value:.1f} MiB max"
                what = f"{op}: peak RSS over baseline <= 10% of checkpoint + 100 MiB (= {need_v:.0f} MiB)"
            out.append(
                {
                    "target": tgt,
                    "workload": wl,
                    "requirement": what,
                    "measured": measured,
                    "value": value,
                    "need": need_v,
                    "met": met,
                }
            )
    for t in out:
        w = workloads.get(t["workload"], {})
        if t["workload"] == "W1" and w.get("nbytes") not in (None, 1 << 30):
            t["requirement"] += f" (run at {w['nbytes'] / MiB:.0f} MiB, target is 1 GiB)"
        if t["workload"] == "W2" and w.get("n_small") not in (None, 10_000):
            t["requirement"] += f" (run at {w['n_small']} tensors, target is 10,000)"
    return out


# -- rendering --------------------------------------------------------------------------------------------------
def _fmt_stats(s: dict[str, float] | None, fmt: str = "{:.2f}") -> tuple[str, str]:
    if not s:
        return "", ""
    return fmt.format(s["median"]), f"{fmt.format(s['min'])}-{fmt.format(s['max'])}"


def _ratio(s: dict[str, float] | None) -> str:
    if not s:
        return ""
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def render_markdown(
    name: str, machine: dict[str, Any], meta: dict[str, Any], rows: list[dict[str, Any]], targets: list[dict[str, Any]]
) -> str:
    ref = reference_contender([{"contender": r["contender"]} for r in rows]) or "ckptstore"
    a = meta.get("args", {})
    L: list[str] = [f"# ckptstore benchmarks: `{name}`", ""]
    L.append(f"- Machine: {machine_line(machine)}")
    L.append(
        f"- Date: {machine.get('date', '')}; load average at start {machine.get('load_avg_start')}, "
        f"at end {machine.get('load_avg_end')} (the machine is shared: other jobs add noise)"
    )
    for tn, ti in machine.get("targets", {}).items():
        extra = ", ".join(f"{k} {ti[k]}" for k in ("fstype", "device", "model", "rotational", "free_gib") if k in ti)
        L.append(f"- Target `{tn}`: {ti.get('path', '')} ({extra})")
    L.append(
        f"- Command: `python -m benchmarks.run {meta.get('command', '')}`; {a.get('repeats')} rounds, "
        f"contenders alternate (order rotated each round), {a.get('warmup')} unrecorded warm-up; "
        f"run took {meta.get('seconds', 0) / 60:.1f} min"
    )
    L.append(
        "- GB/s = checkpoint payload bytes (all tensor bytes, same for every contender) / wall time, GB = 1e9 B. "
        "Median over rounds, min-max after it. Every save fsyncs its files and directory."
    )
    L.append(
        f"- `vs raw` = this / raw, `{ref} x` = {ref} / this; both computed per round (same round) then the median "
        "(min-max) is shown."
    )
    L.append(
        "- Each measurement is a fresh process; RSS = peak resident set (kernel VmHWM, reset before the operation, "
        "plus a 2 ms psutil sampler) minus the RSS right before the operation. `load` returns fresh tensors, so "
        "~100% of the checkpoint is expected there."
    )
    L.append(
        "- Reads are **warm**: right before each read the runner reads the contender's files once, so they are in "
        "the page cache (just-written pages can otherwise be dropped by the VM's memory reclaim). The machine's "
        "caches are never dropped (other people use it); `(cold)` rows, when present, evicted only this "
        "benchmark's files first (`posix_fadvise(DONTNEED)`). `load` includes reading every byte of the result "
        "once (crc32c), for every contender, so lazy/mmap loaders pay for their page faults."
    )
    L.append("")
    if targets:
        L += ['## Targets (issue "Core", performance)', ""]
        L.append("| target | workload | requirement | measured | met |")
        L.append("|---|---|---|---|---|")
        for t in targets:
            L.append(
                f"| {t['target']} | {t['workload']} | {t['requirement']} | {t['measured']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
        L.append("")
    wls = meta.get("workloads", {})
    for tgt in dict.fromkeys(r["target"] for r in rows):
        for wl in dict.fromkeys(r["workload"] for r in rows if r["target"] == tgt):
            w = wls.get(wl, {})
            L.append(f"## {tgt}: {w.get('describe', wl)} ({w.get('nbytes', 0) / MiB:.0f} MiB)")
            L.append("")
            L.append(
                f"| contender | op | GB/s | min-max | seconds | vs raw | {ref} x | RSS over base MiB (max) "
                "| RSS / ckpt | files |"
            )
            L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                if r["target"] != tgt or r["workload"] != wl:
                    continue
                g, gr = _fmt_stats(r["gbps"])
                s, _ = _fmt_stats(r["seconds"], "{:.3f}")
                rm = r["rss_over_mib"]
                rss = f"{rm['median']:.0f} ({rm['max']:.0f})" if rm else ""
                frac = f"{r['rss_over_frac']['median'] * 100:.0f}%" if r["rss_over_frac"] else ""
                files = "" if r["files"] is None else f"{r['files']:.0f}"
                L.append(
                    f"| {r['contender']} | {r['op']} | **{g}** | {gr} | {s} | {_ratio(r['vs_raw'])} | "
                    f"{_ratio(r['ref_over_this'])} | {rss} | {frac} | {files} |"
                )
            L.append("")
    probs = meta.get("problems") or []
    if probs:
        L += ["## Problems", ""] + [f"- {p}" for p in probs] + [""]
    return "\n".join(L)


def render_plot(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any], machine: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["target"], r["workload"]) for r in rows))
    if not panels:
        return
    cols = min(2, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(8 * cols, 4.2 * nrows), squeeze=False)
    wls = meta.get("workloads", {})
    for ax, (tgt, wl) in zip(axes.flat, panels):
        sub = [r for r in rows if r["target"] == tgt and r["workload"] == wl]
        contenders = list(dict.fromkeys(r["contender"] for r in sub))
        ops = [o for o in OPS_ORDER if any(r["op"] == o for r in sub)]
        width = 0.8 / max(1, len(ops))
        for j, op in enumerate(ops):
            xs, ys, lo, hi = [], [], [], []
            for i, c in enumerate(contenders):
                r = next((x for x in sub if x["contender"] == c and x["op"] == op), None)
                if r is None or not r["gbps"]:
                    continue
                g = r["gbps"]
                xs.append(i + (j - (len(ops) - 1) / 2) * width)
                ys.append(g["median"])
                lo.append(g["median"] - g["min"])
                hi.append(g["max"] - g["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=op)
        ax.set_xticks(range(len(contenders)))
        ax.set_xticklabels(contenders, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("GB/s (median, min-max)")
        w = wls.get(wl, {})
        ax.set_title(f"{tgt}: {w.get('describe', wl)}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"ckptstore benchmarks - {machine_line(machine)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(
    out_dir: Path,
    name: str,
    machine: dict[str, Any],
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    plot: bool = True,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    targets = check_targets(rows, meta.get("workloads", {}))
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    doc = {"machine": machine, "meta": meta, "targets": targets, "summary": rows, "records": records}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["md"].write_text(render_markdown(name, machine, meta, rows, targets))
    if plot:
        paths["png"] = out_dir / f"{name}.png"
        render_plot(paths["png"], rows, meta, machine)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Re-render the markdown and the plot of a results JSON file."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.report benchmarks/results/NAME.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    doc = json.loads(src.read_text())
    write_all(src.parent, src.stem, doc["machine"], doc["meta"], doc["records"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
