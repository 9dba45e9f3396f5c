"""The ``ckptstore`` command line: inspect, verify, copy, mirror, prune, export and import checkpoints.

Run ``ckptstore --help`` (or ``python -m ckptstore --help``) for the commands; every command's ``--help`` ends
with an example. Tables and progress bars use ``rich`` on a terminal; piped output is plain text, and every
listing has ``--json``.

Example::

    $ ckptstore ls s3://bucket/run-7 --storage-options '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'
    $ ckptstore verify ./checkpoints && ckptstore export ./checkpoints latest model.safetensors --select model
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._version import __version__
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    UnsafeCheckpointError,
)

log = logging.getLogger("ckptstore")

EXIT_OK = 0
EXIT_FAILED = 1
"""Verification failed (also: ``diff --exit-code`` found differences; a copy refused corrupt data)."""
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ERROR = 4

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  verification failed (a checksum, size or header did not match; the message names step, file and key);
     for `diff --exit-code`: the steps differ
  2  usage error (bad arguments, invalid --storage-options, invalid policy)
  3  not found (no such checkpoint root, step, key or input file)
  4  any other error (storage, permissions, malformed manifest, unsafe pickle refused, step already exists)

--json output is strict JSON; non-finite floats are written as {"$float": "nan" | "inf" | "-inf"} like in
manifest.json. Errors are one line on stderr ("ckptstore CMD: <kind>: <message>"); -v adds the traceback.

environment:
  CKPTSTORE_STORAGE_OPTIONS  default for --storage-options (JSON)
  NO_COLOR                   disable colours; output is plain whenever stdout is not a terminal
"""


class UsageError(Exception):
    """Bad command-line input detected after parsing (exit code 2)."""


# -- output ----------------------------------------------------------------------------------------------------
def _rich() -> Any:
    try:
        import rich
    except ImportError:  # rich is optional (ckptstore[cli])
        return None
    import rich.console

    return rich


class Ui:
    """Where the CLI writes: rich tables/progress on a terminal, plain text or JSON otherwise."""

    def __init__(self, *, plain: bool = False, progress: bool = True, verbose: int = 0) -> None:
        rich = _rich()
        force = os.environ.get("CKPTSTORE_FORCE_TERMINAL") == "1"
        self.verbose = verbose
        self.rich = rich is not None and not plain and (force or sys.stdout.isatty())
        self.show_progress = rich is not None and progress and not plain and (force or sys.stderr.isatty())
        self._console: Any = None
        if self.rich:
            from rich.console import Console

            self._console = Console(force_terminal=force or None, highlight=False, soft_wrap=True)

    def out(self, text: str = "") -> None:
        print(_printable(text), flush=True)

    def err(self, text: str) -> None:
        print(_printable(text), file=sys.stderr, flush=True)

    def json(self, obj: Any) -> None:
        # json escapes C0 controls itself; DEL and C1 controls (e.g. \x9b, a one-byte CSI) as \u escapes too.
        text = json.dumps(obj, indent=2, allow_nan=False, ensure_ascii=False)
        print(_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text), flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> None:
        if self.rich:
            from rich.table import Table
            from rich.text import Text

            t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
            for i, h in enumerate(headers):
                t.add_column(h, justify="right" if i in right else "left", no_wrap=i != len(headers) - 1)
            for r in rows:
                t.add_row(*(Text(c) for c in r))
            self._console.print(t)
            return
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

        def fmt(cells: Sequence[str]) -> str:
            parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
            return "  ".join(parts).rstrip()

        self.out(fmt(headers))
        for r in rows:
            self.out(fmt(r))

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A byte progress bar on stderr (terminal only); yields a thread-safe ``advance(nbytes)``."""
        if not self.show_progress:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as p:
            task = p.add_task(description, total=total)
            yield lambda n: p.advance(task, n)


# -- formatting helpers -------------------------------------------------------------------------------------------
def human_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v, default=str)


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items())


def _fmt_time(ts: float) -> str:
    if not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat()


def _jsonable(v: Any) -> Any:
    from .interop import to_json_value

    return to_json_value(v)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` with control characters (other than tab and newline) shown as ``\\xNN``: names and messages read
    from a checkpoint cannot drive the terminal (ANSI escapes, title changes, cursor moves)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _one_line(msg: str) -> str:
    return _printable(" ".join(str(msg).split()))


# -- argument helpers ---------------------------------------------------------------------------------------------
def _parse_options(text: str | None, flag: str) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    src = text
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                src = f.read()
        except OSError as e:
            raise UsageError(f"{flag}: cannot read {text[1:]}: {e.strerror or e}") from None
    try:
        opts = json.loads(src)
    except ValueError as e:
        raise UsageError(f"{flag} must be a JSON object (or @file.json): {e}") from None
    if not isinstance(opts, dict):
        raise UsageError(f"{flag} must be a JSON object, got {type(opts).__name__}")
    return opts


def _global_options(args: argparse.Namespace) -> dict[str, Any]:
    text = getattr(args, "storage_options", None)
    if text is None:
        text = os.environ.get("CKPTSTORE_STORAGE_OPTIONS")
    return _parse_options(text, "--storage-options")


def _side_options(args: argparse.Namespace, side: str) -> dict[str, Any]:
    text = getattr(args, f"{side}_storage_options", None)
    if text is not None:
        return _parse_options(text, f"--{side}-storage-options")
    return _global_options(args)


def _manager(url: str, opts: dict[str, Any]) -> Any:
    from .manager import CheckpointManager

    return CheckpointManager(url, storage_options=opts)


_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


def _url(text: str) -> str:
    """A checkpoint root argument: not empty (which would mean the current directory), a bucket where the scheme
    needs one."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "empty URL: give a checkpoint root, e.g. ./checkpoints or s3://bucket/prefix (use . for the current "
            "directory)"
        )
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte")
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in _BUCKET_SCHEMES and not rest.split("/", 1)[0]:
        raise argparse.ArgumentTypeError(f"{text!r} names no bucket: write {scheme}://BUCKET/PREFIX")
    return text


def _input_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty input path: give a .pt/.pth/.safetensors file or a DCP directory")
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte")
    return text


def _step_spec(text: str) -> int | str:
    if text in ("latest", "best"):
        return text
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: use an integer, 'latest' or 'best'") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: steps are non-negative")
    return step


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def _positive_int(text: str) -> int:
    v = _nonneg_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative number of seconds")
    return v


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    if not k:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty key")
    try:
        value = json.loads(v)
    except ValueError:
        value = v  # a bare string
    return k, value


def _resolve_step(mgr: Any, spec: int | str) -> int:
    if isinstance(spec, int):
        return spec
    info = mgr.latest() if spec == "latest" else mgr.best()
    if info is None:
        what = "committed step" if spec == "latest" else "committed step with a finite numeric 'loss' metric"
        raise CheckpointNotFoundError(f"no {what} under {mgr.url}")
    return int(info.step)


def _require_root(mgr: Any, url: str) -> None:
    if not mgr.storage.exists(""):
        raise CheckpointNotFoundError(f"no checkpoint root at {url}")


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, ui: Ui) -> int:
    mgr = _manager(args.url, _global_options(args))
    infos = mgr.history(include_quarantined=args.all)
    if not infos:
        _require_root(mgr, args.url)
    pinned = set(mgr.pinned()) if infos else set()
    if args.json:
        ui.json(
            [
                {
                    "step": i.step,
                    "epoch": i.epoch,
                    "metrics": _jsonable(i.metrics),
                    "metadata": _jsonable(i.metadata),
                    "nbytes": i.nbytes,
                    "world_size": i.world_size,
                    "created_at": i.created_at,
                    "created": _iso(i.created_at),
                    "pinned": i.step in pinned,
                    "url": i.url,
                    "generation": i.generation,
                    "parent": None if i.parent is None else {"step": i.parent[0], "generation": i.parent[1]},
                    "quarantined": i.quarantined,
                }
                for i in infos
            ]
        )
        return EXIT_OK
    if not infos:
        ui.err(f"ckptstore ls: no committed steps under {args.url}")
        return EXIT_OK
    headers = ["step", "epoch", "metrics", "size", "world size", "created"]
    # Lineage columns once there is lineage to show: a step saved again, or quarantined generations (--all).
    lineage = any(i.generation > 1 or i.quarantined for i in infos)
    if lineage:
        headers += ["gen", "parent", "status"]
    rows = []
    for i in infos:
        row = [
            str(i.step) + (" *" if i.step in pinned else ""),
            "-" if i.epoch is None else str(i.epoch),
            _fmt_metrics(i.metrics) or "-",
            human_bytes(i.nbytes),
            str(i.world_size),
            _fmt_time(i.created_at),
        ]
        if lineage:
            parent = "-" if i.parent is None else str(i.parent[0]) + (f".g{i.parent[1]}" if i.parent[1] > 1 else "")
            row += [str(i.generation), parent, "ok" if not i.quarantined else i.quarantined.split(":")[0]]
        rows.append(row)
    ui.table(headers, rows, right=(0, 1, 3, 4))
    if pinned:
        ui.out("(* pinned)")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, ui: Ui) -> int:
    import torch

    from .artifacts import list_artifacts
    from .interop import summarize

    mgr = _manager(args.url, _global_options(args))
    step = _resolve_step(mgr, args.step)
    m = mgr.manifest(step)
    info = mgr.info(step)
    try:
        arts = list_artifacts(mgr.storage, step)
    except CheckpointError as e:  # a damaged sidecar must not hide the step itself
        log.warning("step %d: cannot list artifacts: %s", step, e)
        arts = []
    pinned = step in set(mgr.pinned())
    sections = summarize(m)
    if args.json:
        tensors = []
        values = []
        for sec in sections:
            for r in sec.rows:
                if r.entry is not None or r.key is not None:
                    e = r.entry
                    tensors.append(
                        {
                            "key": r.key,
                            "section": sec.name,
                            "path": r.path,
                            "shape": list(e.shape) if e else None,
                            "dtype": e.dtype if e else None,
                            "nbytes": e.nbytes if e else None,
                            "device": e.device if e else None,
                            "encoding": e.encoding if e else None,
                            "pieces": len(e.pieces) if e else 0,
                        }
                    )
                else:
                    values.append({"section": sec.name, "path": r.path, "value": _jsonable(r.value)})
        ui.json(
            {
                "step": m.step,
                "url": info.url,
                "epoch": m.epoch,
                "metrics": _jsonable(m.metrics),
                "metadata": _jsonable(m.metadata),
                "created_at": m.created_at,
                "created": _iso(m.created_at),
                "world_size": m.world_size,
                "nbytes": m.nbytes,
                "format_version": m.format_version,
                "save_id": m.save_id,
                "versions": m.versions,
                "files": m.files,
                "pinned": pinned,
                "sections": [{"name": s.name, "class": s.cls} for s in sections if s.name is not None],
                "tensors": tensors,
                "values": values,
                "artifacts": [a.to_dict() for a in arts],
            }
        )
        return EXIT_OK
    limit = None if args.full else 400

    def short(text: str) -> str:
        if limit is not None and len(text) > limit:
            return text[:limit] + f"… ({len(text)} chars, --full shows all)"
        return text

    ui.out(f"step {m.step}  ({info.url})")
    fields = [
        ("epoch", "-" if m.epoch is None else str(m.epoch)),
        ("metrics", _fmt_metrics(m.metrics) or "-"),
        ("metadata", json.dumps(_jsonable(m.metadata)) if m.metadata else "-"),
        ("created", _fmt_time(m.created_at)),
        ("world size", str(m.world_size)),
        ("size", f"{human_bytes(m.nbytes)} in {len(m.files)} files, {len(m.tensors)} tensors"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items()) or "-"),
        ("pinned", "yes" if pinned else "no"),
        ("artifacts", ", ".join(f"{a.name} ({a.kind}, {human_bytes(a.size)})" for a in arts) or "-"),
    ]
    for k, v in fields:
        ui.out(f"{k + ':':<12}{v}")
    if m.has_pickles:
        ui.out(f"{'warning:':<12}contains pickled objects: export only with --trusted (trusted=True in Python)")
    for sec in sections:
        ui.out()
        if sec.name is None and len(sections) > 1:
            ui.out("Other values:")
        elif sec.name is None:
            ui.out("State:" if not sec.cls else f"State ({sec.cls}):")
        else:
            ui.out(f"{sec.name}'s state_dict" + (f" ({sec.cls}):" if sec.cls else ":"))
        for r in sec.rows:
            e = r.entry
            if r.key is not None and e is None:
                ui.out(f"{r.path} \t <missing from the tensor table>")
            elif e is not None and e.encoding == "pickle":
                ui.out(f"{r.path} \t <pickled object, {e.nbytes} bytes; not loaded>")
            elif e is not None:
                ui.out(f"{r.path} \t {torch.Size(e.shape)} \t torch.{e.dtype}")
            else:
                ui.out(f"{r.path} \t {short(repr(r.value))}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, ui: Ui) -> int:
    from .transfer import step_bytes, verify_step

    mgr = _manager(args.url, _global_options(args))
    if args.steps:
        steps = sorted({_resolve_step(mgr, s) for s in args.steps})
        committed = set(mgr.steps())
        absent = [s for s in steps if s not in committed]
        if absent:  # exit 3 before any work
            raise CheckpointNotFoundError(
                f"step(s) {', '.join(map(str, absent))} are not committed under {args.url}", step=absent[0]
            )
    else:
        steps = mgr.steps()
        if not steps:
            _require_root(mgr, args.url)
            raise CheckpointNotFoundError(f"no committed steps under {args.url}: nothing to verify")
    total = 0
    for s in steps:
        try:
            total += step_bytes(mgr.storage, s)
        except CheckpointError:
            pass  # verify_step reports it
    results = []
    with ui.progress("verifying", total) as advance:
        for s in steps:
            res = verify_step(mgr.storage, s, progress=advance)
            results.append(res)
            if not args.json:
                if res.ok:
                    ui.out(
                        f"step {s}: OK ({human_bytes(res.nbytes)}, {res.files} files, {res.tensors} tensors"
                        + (f", {res.artifacts} artifacts" if res.artifacts else "")
                        + ")"
                    )
                else:
                    ui.out(f"step {s}: FAILED ({len(res.problems)} problems)")
                    for p in res.problems:
                        ui.out(f"  {p}")
    bad = [p for r in results for p in r.problems]
    if args.json:
        ui.json({"ok": not bad, "steps": [r.to_dict() for r in results]})
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        ui.err(f"ckptstore verify: verification failed: {_one_line(str(bad[0]))}{more}")
        return EXIT_FAILED
    return EXIT_OK


def _open(url: str, opts: dict[str, Any]) -> Any:
    from .storage import open_storage

    return open_storage(url, opts)


def _same_root(a: Any, b: Any) -> bool:
    return bool(a.url.rstrip("/") == b.url.rstrip("/"))


def _error_code(e: BaseException) -> int:
    if isinstance(e, UsageError | ConfigError):
        return EXIT_USAGE
    if isinstance(e, IntegrityError):
        return EXIT_FAILED
    if isinstance(e, FileNotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_ERROR


def cmd_cp(args: argparse.Namespace, ui: Ui) -> int:
    from .transfer import committed_steps, copy_steps, step_bytes

    src = _open(args.src, _side_options(args, "src"))
    dst = _open(args.dst, _side_options(args, "dst"))
    if _same_root(src, dst):
        raise UsageError(f"SRC and DST are the same root ({src.url})")
    available = committed_steps(src)
    if not available:
        if not src.exists(""):
            raise CheckpointNotFoundError(f"no checkpoint root at {args.src}")
        raise CheckpointNotFoundError(f"no committed steps under {args.src}: nothing to copy")
    if args.latest:
        wanted: list[int] | None = [available[-1]]
    elif args.step:
        wanted = sorted(set(args.step))
    else:
        wanted = None
    have = set(committed_steps(dst))
    todo = [s for s in (wanted if wanted is not None else available) if s not in have and s in available]
    total = 0
    for s in todo:
        with contextlib.suppress(CheckpointError):
            total += step_bytes(src, s)
    failed: list[tuple[int, BaseException]] = []
    results = []

    def on_step(res: Any) -> None:
        results.append(res)
        if args.json:
            return
        if res.copied:
            extra = f", artifacts: {', '.join(res.artifacts)}" if res.artifacts else ""
            ui.out(f"step {res.step}: copied ({human_bytes(res.nbytes)}, {res.files} files, {res.seconds:.2f}s{extra})")
        else:
            ui.out(f"step {res.step}: already in {args.dst}, skipped")

    def on_error(step: int, e: BaseException) -> None:
        failed.append((step, e))
        if not args.json:
            ui.err(f"step {step}: FAILED: {_one_line(str(e))}")

    with ui.progress("copying", total) as advance:
        copy_steps(src, dst, wanted, on_step=on_step, on_error=on_error, verify=not args.no_verify, progress=advance)
    if args.json:
        ui.json(
            {
                "copied": [r.to_dict() for r in results if r.copied],
                "skipped": [r.step for r in results if not r.copied],
                "failed": [{"step": s, "error": f"{type(e).__name__}: {e}"} for s, e in failed],
            }
        )
    if failed:
        step, e = failed[0]
        more = f" (+{len(failed) - 1} more failed steps)" if len(failed) > 1 else ""
        ui.err(f"ckptstore cp: step {step} was not copied: {_one_line(str(e))}{more}")
        codes = {_error_code(e) for _, e in failed}
        return EXIT_FAILED if codes == {EXIT_FAILED} else EXIT_ERROR
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, ui: Ui) -> int:
    from .transfer import mirror, sync_once

    src = _open(args.src, _side_options(args, "src"))
    dst = _open(args.dst, _side_options(args, "dst"))
    if _same_root(src, dst):
        raise UsageError(f"SRC and DST are the same root ({src.url})")
    if not src.exists(""):
        raise CheckpointNotFoundError(f"no checkpoint root at {args.src}")
    failed: list[tuple[int | None, BaseException]] = []
    copied: list[Any] = []

    def on_step(res: Any) -> None:
        copied.append(res)
        if args.json and args.watch:
            print(json.dumps({"event": "copied", **res.to_dict()}), flush=True)
        elif not args.json:
            if res.copied:
                ui.out(f"step {res.step}: copied ({human_bytes(res.nbytes)}, {res.files} files, {res.seconds:.2f}s)")
            else:
                ui.out(f"step {res.step}: artifacts copied: {', '.join(res.artifacts)}")

    def on_error(step: int | None, e: BaseException) -> None:
        failed.append((step, e))
        where = f"step {step}" if step is not None else "listing"
        if args.json and args.watch:
            print(json.dumps({"event": "error", "step": step, "error": f"{type(e).__name__}: {e}"}), flush=True)
        else:
            ui.err(f"{where}: FAILED: {_one_line(str(e))}")

    verify = not args.no_verify
    if not args.watch:
        with ui.progress("syncing", None) as advance:
            sync_once(src, dst, on_step=on_step, on_error=on_error, verify=verify, progress=advance)
        if args.json:
            ui.json(
                {
                    "copied": [r.to_dict() for r in copied],
                    "failed": [{"step": s, "error": f"{type(e).__name__}: {e}"} for s, e in failed],
                }
            )
        elif not copied and not failed:
            ui.out(f"{args.dst} is up to date")
        if failed:
            codes = {_error_code(e) for _, e in failed}
            ui.err(f"ckptstore sync: {len(failed)} step(s) not copied; first: {_one_line(str(failed[0][1]))}")
            return EXIT_FAILED if codes == {EXIT_FAILED} else EXIT_ERROR
        return EXIT_OK

    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        stop.set()
        # A second signal ends the process the default way.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    ui.err(f"ckptstore sync: mirroring {args.src} -> {args.dst} every {args.interval:g}s (Ctrl-C or SIGTERM stops)")
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["n"] = mirror(src, dst, stop=stop, interval=args.interval, on_step=on_step, on_error=on_error,
                              verify=verify)  # fmt: skip
        except BaseException as e:  # pragma: no cover - mirror handles its own errors
            box["error"] = e
            stop.set()

    t = threading.Thread(target=run, name="ckpt-sync", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.25)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if "error" in box:
        raise box["error"]
    n = box.get("n", 0)
    ui.err(f"ckptstore sync: stopped; {n} step(s) copied")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, ui: Ui) -> int:
    from .interop import export_format, export_step

    fmt = args.format
    hf_only = [flag for flag, v in (("--rename", args.rename), ("--dtype", args.dtype),
               ("--max-shard-size", args.max_shard_size), ("--copy-from", args.copy_from)) if v]  # fmt: skip
    if fmt != "hf":
        if hf_only:
            raise UsageError(f"{', '.join(hf_only)} only apply to --format hf")
        try:
            detected = export_format(args.out)
        except CheckpointError as e:
            raise UsageError(f"{e} (or pass --format hf for a Hugging Face model directory)") from None
        if fmt is not None and fmt != detected:
            raise UsageError(f"--format {fmt} does not match OUT {args.out!r} (a {detected} file name)")
    mgr = _manager(args.url, _global_options(args))
    step = _resolve_step(mgr, args.step)
    if fmt == "hf":
        return _export_hf(args, ui, mgr, step)
    res = export_step(mgr, step, args.out, select_path=args.select, trusted=args.trusted, overwrite=args.force)
    if args.json:
        ui.json(res.to_dict())
    else:
        what = f" ({args.select})" if args.select else ""
        ui.out(
            f"exported step {res.step}{what} to {res.path}: {res.tensors} tensors, {human_bytes(res.nbytes)} "
            f"({res.format})"
        )
    return EXIT_OK


def _export_hf(args: argparse.Namespace, ui: Ui, mgr: Any, step: int) -> int:
    from .hf import DEFAULT_MAX_SHARD_BYTES, export_hf, parse_rename, parse_size

    try:
        rules = [parse_rename(r) for r in args.rename or []]
        shard = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_MAX_SHARD_BYTES
    except ConfigError as e:
        raise UsageError(str(e)) from None
    res = export_hf(
        mgr,
        step,
        args.out,
        select=args.select if args.select is not None else "model",
        key_map=rules or None,
        dtype=args.dtype,
        max_shard_bytes=shard,
        copy_from=args.copy_from,
        overwrite=args.force,
    )
    if args.json:
        ui.json(res.to_dict())
    else:
        tied = f", {len(res.tied)} tied written once" if res.tied else ""
        copied = f"; copied {', '.join(res.copied)}" if res.copied else ""
        ui.out(
            f"exported step {res.step} to {res.path} (Hugging Face layout): {res.tensors} tensors, "
            f"{human_bytes(res.nbytes)} in {len(res.files)} files{tied}{copied}"
        )
    return EXIT_OK


def cmd_import(args: argparse.Namespace, ui: Ui) -> int:
    from .interop import import_external

    mgr = _manager(args.url, _global_options(args))
    res = import_external(
        args.input,
        mgr,
        args.step,
        epoch=args.epoch,
        metrics=dict(args.metric) if args.metric else None,
        metadata=dict(args.metadata or []),
        under=args.under,
        trusted=args.trusted,
    )
    info = mgr.info(args.step)
    if args.json:
        ui.json(
            {
                "step": res.step,
                "url": res.url,
                "nbytes": res.nbytes,
                "files": res.files,
                "epoch": info.epoch,
                "metrics": _jsonable(info.metrics),
                "format": info.metadata.get("import_format"),
            }
        )
    else:
        ui.out(
            f"imported {args.input} ({info.metadata.get('import_format')}) as step {res.step}: "
            f"{human_bytes(res.nbytes)} in {res.files} files -> {res.url}"
        )
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, ui: Ui) -> int:
    import torch

    from .interop import diff_steps

    opts = _global_options(args)
    mgr_a = _manager(args.url, opts)
    mgr_b = _manager(args.b_url, opts) if args.b_url is not None else mgr_a
    a = _resolve_step(mgr_a, args.a)
    b = _resolve_step(mgr_b, args.b)
    ma, mb = mgr_a.manifest(a), mgr_b.manifest(b)
    with ui.progress("comparing", ma.nbytes + mb.nbytes) as advance:
        d = diff_steps(mgr_a.storage, ma, mgr_b.storage, mb, progress=advance)
    if args.json:
        ui.json(d.to_dict())
    else:
        ui.out(f"--- step {a}  ({mgr_a.storage.url_of('')})")
        ui.out(f"+++ step {b}  ({mgr_b.storage.url_of('')})")
        counts: dict[str, int] = {}
        for t in d.tensors:
            counts[t.status] = counts.get(t.status, 0) + 1
            ea, eb = t.a, t.b
            if t.status == "added":
                assert eb is not None
                ui.out(f"+ {t.key} \t {torch.Size(eb.shape)} \t torch.{eb.dtype}")
            elif t.status == "removed":
                assert ea is not None
                ui.out(f"- {t.key} \t {torch.Size(ea.shape)} \t torch.{ea.dtype}")
            elif t.status == "shape":
                assert ea is not None and eb is not None
                ui.out(f"~ {t.key} \t shape {torch.Size(ea.shape)} -> {torch.Size(eb.shape)}")
            elif t.status == "dtype":
                assert ea is not None and eb is not None
                ui.out(f"~ {t.key} \t dtype torch.{ea.dtype} -> torch.{eb.dtype}, max abs diff {t.max_abs_diff:.6g}")
            elif t.status == "encoding":
                ui.out(f"~ {t.key} \t tensor <-> pickled object")
            elif t.status == "changed":
                mad = "pickled object changed" if t.max_abs_diff is None else f"max abs diff {t.max_abs_diff:.6g}"
                ui.out(f"~ {t.key} \t {mad}")
            elif args.all:
                ui.out(f"= {t.key}")
        for v in d.values:
            ui.out(f"~ {v.path}: {_fmt_change(v)}")
        for v in d.info:
            ui.out(f"  ({v.path}: {_fmt_change(v)})")
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no tensors"
        ui.out(
            f"{'identical' if d.identical else 'different'}: {summary}"
            + (f", {len(d.values)} values changed" if d.values else "")
        )
    if args.exit_code and not d.identical:
        return EXIT_FAILED
    return EXIT_OK


def _fmt_change(v: Any) -> str:
    if v.status == "added":
        return f"added {v.b!r}"
    if v.status == "removed":
        return f"removed (was {v.a!r})"
    return f"{v.a!r} -> {v.b!r}"


def cmd_prune(args: argparse.Namespace, ui: Ui) -> int:
    from .retention import explain, retention_from_dict

    spec: dict[str, Any] = {}
    if args.keep_last is not None:
        spec["keep_last"] = args.keep_last
    if args.keep_best is not None:
        spec["keep_best"] = {"k": args.keep_best, "metric": args.metric, "mode": args.mode}
    if args.keep_every_steps is not None:
        spec["keep_every_steps"] = args.keep_every_steps
    if args.keep_every_epochs is not None:
        spec["keep_every_epochs"] = args.keep_every_epochs
    if args.keep_interval is not None:
        spec["keep_interval_seconds"] = args.keep_interval
    if not spec:
        raise UsageError(
            "give at least one policy: --keep-last, --keep-best, --keep-every-steps, --keep-every-epochs or "
            "--keep-interval (prune never deletes without one)"
        )
    policy = retention_from_dict(spec, where="prune")
    mgr = _manager(args.url, _global_options(args))
    infos = mgr.history()
    if not infos:
        _require_root(mgr, args.url)
    decisions = explain(infos, policy, now=time.time(), pinned=mgr.pinned())
    deleted: list[int] = []
    errors: list[tuple[int, BaseException]] = []
    for d in decisions:
        if not args.json:
            verb = "keep  " if d.keep else ("would delete" if args.dry_run else "delete")
            ui.out(f"step {d.step}: {verb} — {'; '.join(d.reasons)}")
        if d.keep or args.dry_run:
            continue
        try:
            mgr.delete(d.step)
            deleted.append(d.step)
        except (OSError, CheckpointError) as e:
            errors.append((d.step, e))
            ui.err(f"step {d.step}: could not delete: {_one_line(str(e))}")
    doomed = [d.step for d in decisions if not d.keep]
    if args.json:
        ui.json(
            {
                "dry_run": args.dry_run,
                "policy": spec,
                "decisions": [{**d.to_dict(), "deleted": d.step in deleted} for d in decisions],
                "deleted": deleted,
                "would_delete": doomed if args.dry_run else [],
            }
        )
    elif args.dry_run:
        ui.out(f"dry run: would delete {len(doomed)} of {len(decisions)} steps")
    else:
        ui.out(f"deleted {len(deleted)} of {len(decisions)} steps")
    if errors:
        return EXIT_ERROR
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, ui: Ui) -> int:
    mgr = _manager(args.url, _global_options(args))
    _require_root(mgr, args.url)
    removed = mgr.gc(min_age_seconds=args.min_age)
    if args.json:
        ui.json({"removed": removed})
        return EXIT_OK
    for r in removed:
        ui.out(f"removed {r}")
    ui.out(f"removed {len(removed)} files of partial or abandoned saves (older than {args.min_age:g}s)")
    return EXIT_OK


def cmd_pin(args: argparse.Namespace, ui: Ui) -> int:
    mgr = _manager(args.url, _global_options(args))
    step = _resolve_step(mgr, args.step)
    if args.command == "pin":
        mgr.pin(step)
        ui.out(f"pinned step {step}: retention will keep it")
    else:
        mgr.manifest(step)
        mgr.unpin(step)
        ui.out(f"unpinned step {step}")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: usage error: {_one_line(message)} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


_EXAMPLE_OPTS = '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\''

_COMMANDS: dict[str, tuple[str, str]] = {
    "ls": (
        "list committed steps (step, epoch, metrics, size, world size, created)",
        "examples:\n  ckptstore ls ./checkpoints\n  ckptstore ls s3://bucket/run-7 --json "
        f"--storage-options {_EXAMPLE_OPTS}",
    ),
    "show": (
        "describe one step: metadata, then every key with its shape and dtype",
        "examples:\n  ckptstore show ./checkpoints 1200\n"
        "  ckptstore show ./checkpoints latest --json | jq '.tensors[].key'",
    ),
    "verify": (
        "re-read every byte of one or all steps and check every checksum",
        "examples:\n  ckptstore verify ./checkpoints          # all steps\n"
        "  ckptstore verify ./checkpoints 1200 || echo corrupt",
    ),
    "cp": (
        "copy committed steps between two roots (data first, manifest last; existing steps skipped)",
        "examples:\n  ckptstore cp /scratch/run-7 s3://bucket/run-7\n"
        "  ckptstore cp /scratch/run-7 /backup/run-7 --step 1000 --step 2000",
    ),
    "sync": (
        "copy the committed steps DST lacks; with --watch keep mirroring new steps",
        "examples:\n  ckptstore sync /scratch/run-7 s3://bucket/run-7\n"
        "  ckptstore sync /scratch/run-7 s3://bucket/run-7 --watch --interval 30   # stops on Ctrl-C/SIGTERM",
    ),
    "export": (
        "write a step as OUT.pt (torch.load(weights_only=True)), OUT.safetensors or a Hugging Face directory",
        "examples:\n  ckptstore export ./checkpoints 1200 full.pt\n"
        "  ckptstore export ./checkpoints latest model.safetensors --select model\n"
        "  ckptstore export ./checkpoints latest hf-model/ --format hf --dtype bf16 --copy-from base-model/",
    ),
    "import": (
        "save a .pt/.pth, .safetensors or torch.distributed.checkpoint directory as a step",
        "examples:\n  ckptstore import model.pth ./checkpoints --step 0 --under model\n"
        "  ckptstore import ./dcp_checkpoint/ ./checkpoints --step 5000 --epoch 12 --metric loss=0.31",
    ),
    "diff": (
        "compare two steps: keys added/removed, shape/dtype changes, max abs difference per tensor",
        "examples:\n  ckptstore diff ./checkpoints 1000 2000\n"
        "  ckptstore diff ./checkpoints latest 1000 --b-url /backup/run-7 --exit-code --json",
    ),
    "prune": (
        "delete steps a retention policy does not keep (prints what and why)",
        "examples:\n  ckptstore prune ./checkpoints --keep-last 3 --keep-best 1 --metric loss --mode min --dry-run\n"
        "  ckptstore prune ./checkpoints --keep-last 5 --keep-every-steps 10000",
    ),
    "gc": (
        "remove partial steps and unreferenced files left by interrupted saves",
        "examples:\n  ckptstore gc ./checkpoints\n  ckptstore gc s3://bucket/run-7 --min-age 3600",
    ),
    "pin": ("protect a step from retention", "example:\n  ckptstore pin ./checkpoints 1200"),
    "unpin": ("remove a step's protection from retention", "example:\n  ckptstore unpin ./checkpoints 1200"),
}


def _add_common(p: argparse.ArgumentParser, *, sub: bool) -> None:
    d = argparse.SUPPRESS if sub else None
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        default=d,
        help="fsspec storage options as a JSON object (or @file.json), passed to fsspec as is",
    )
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if sub else 0,
                   help="log more (-vv: debug) and show tracebacks")  # fmt: skip
    p.add_argument("--plain", action="store_true", default=argparse.SUPPRESS if sub else False,
                   help="plain text even on a terminal (no rich tables/colours)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS if sub else False,
                   help="no progress bars")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptstore`` argument parser (exposed for documentation and tests)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="ckptstore",
        description="Inspect, verify, copy, mirror, prune, export and import ckptstore checkpoints.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    _add_common(parser, sub=False)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True

    def sub(name: str, func: Callable[[argparse.Namespace, Ui], int]) -> argparse.ArgumentParser:
        help_, example = _COMMANDS[name]
        p = subs.add_parser(name, help=help_, description=help_ + ".", epilog=example + "\n\n" + EXIT_CODES_HELP,
                            formatter_class=fmt)  # fmt: skip
        _add_common(p, sub=True)
        p.set_defaults(func=func)
        return p

    url_help = "checkpoint root: a path, file://, s3://bucket/prefix or any fsspec URL"
    p = sub("ls", cmd_ls)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("--json", action="store_true", help="print a JSON list (step, epoch, metrics, nbytes, ...)")
    p.add_argument(
        "--all",
        action="store_true",
        help="also quarantined generations (failed verification, superseded timelines): the full lineage",
    )

    p = sub("show", cmd_show)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("step", metavar="STEP", type=_step_spec, help="step number, 'latest' or 'best'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--full", action="store_true", help="do not shorten long values")

    p = sub("verify", cmd_verify)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("steps", metavar="STEP", nargs="*", type=_step_spec, help="steps to verify (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON report")

    for name, func in (("cp", cmd_cp), ("sync", cmd_sync)):
        p = sub(name, func)
        p.add_argument("src", metavar="SRC", type=_url, help="source root URL")
        p.add_argument("dst", metavar="DST", type=_url, help="destination root URL")
        p.add_argument("--src-storage-options", metavar="JSON", help="storage options for SRC only")
        p.add_argument("--dst-storage-options", metavar="JSON", help="storage options for DST only")
        p.add_argument("--no-verify", action="store_true", help="do not check piece checksums while copying")
        p.add_argument("--json", action="store_true", help="print JSON (with --watch: one JSON object per line)")
        if name == "cp":
            p.add_argument("--step", type=_nonneg_int, action="append", metavar="N",
                           help="copy this step (repeatable; default: every committed step)")  # fmt: skip
            p.add_argument("--latest", action="store_true", help="copy only the newest committed step")
        else:
            p.add_argument("--watch", action="store_true", help="keep polling SRC and mirror new steps")
            p.add_argument("--interval", type=_seconds, default=30.0, metavar="S",
                           help="seconds between polls with --watch (default 30)")  # fmt: skip

    p = sub("export", cmd_export)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("step", metavar="STEP", type=_step_spec, help="step number, 'latest' or 'best'")
    p.add_argument("out", metavar="OUT", help="output file: *.pt / *.pth or *.safetensors; a directory for hf")
    p.add_argument(
        "--format",
        choices=("torch", "safetensors", "hf"),
        default=None,
        help="output format (default: from OUT's name); hf: model.safetensors or model-0000i-of-0000N.safetensors "
        "+ model.safetensors.index.json, for from_pretrained",
    )
    p.add_argument(
        "--select", metavar="PATH", help="export only this subtree, e.g. 'model' (a plain state_dict; hf's default)"
    )
    p.add_argument(
        "--rename",
        metavar="REGEX=REPL",
        action="append",
        help="--format hf: rename tensors with re.sub (repeatable, applied in order, after module./_orig_mod. "
        "prefixes are stripped; an empty result drops the tensor)",
    )
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="--format hf: cast floating tensors")
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="--format hf: largest weights file, e.g. 2GB or 500MiB (default 5GB, as save_pretrained)",
    )
    p.add_argument(
        "--copy-from",
        metavar="DIR",
        help="--format hf: copy config.json, generation_config.json and tokenizer files from DIR (regular files "
        "only, never through symlinks)",
    )
    p.add_argument("--trusted", action="store_true", help="allow steps with pickled objects (unpickles them)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub("import", cmd_import)
    p.add_argument("input", metavar="IN", type=_input_path,
                   help="a .pt/.pth file, a .safetensors file or a DCP directory")  # fmt: skip
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("--step", type=_nonneg_int, required=True, metavar="N", help="step number to save as")
    p.add_argument("--epoch", type=_nonneg_int, metavar="E", help="epoch to record")
    p.add_argument("--metric", type=_kv, action="append", metavar="K=V", help="metric to record (repeatable)")
    p.add_argument("--metadata", type=_kv, action="append", metavar="K=V", help="metadata to record (repeatable)")
    p.add_argument("--under", metavar="KEY", help="nest the imported state under KEY (e.g. 'model')")
    p.add_argument("--trusted", action="store_true",
                   help="allow pickled Python objects in IN (unpickling runs code from the file)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub("diff", cmd_diff)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("a", metavar="A", type=_step_spec, help="first step")
    p.add_argument("b", metavar="B", type=_step_spec, help="second step")
    p.add_argument("--b-url", metavar="URL", type=_url, help="read B from this root instead of URL")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the steps differ")
    p.add_argument("--all", action="store_true", help="also list identical tensors")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub("prune", cmd_prune)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("--keep-last", type=_positive_int, metavar="N", help="keep the N newest steps")
    p.add_argument("--keep-best", type=_positive_int, metavar="K", help="keep the K best steps by --metric")
    p.add_argument("--metric", default="loss", help="metric for --keep-best (default: loss)")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="best is min or max (default: min)")
    p.add_argument("--keep-every-steps", type=_positive_int, metavar="N", help="keep steps that are multiples of N")
    p.add_argument("--keep-every-epochs", type=_positive_int, metavar="N",
                   help="keep the first step of every N-th epoch")  # fmt: skip
    p.add_argument("--keep-interval", type=_seconds, metavar="SECONDS", help="keep one step per time interval")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub("gc", cmd_gc)
    p.add_argument("url", metavar="URL", type=_url, help=url_help)
    p.add_argument("--min-age", type=_seconds, default=600.0, metavar="SECONDS",
                   help="only touch files older than this (default 600): a running save is left alone")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")

    for name in ("pin", "unpin"):
        p = sub(name, cmd_pin)
        p.add_argument("url", metavar="URL", type=_url, help=url_help)
        p.add_argument("step", metavar="STEP", type=_step_spec, help="step number, 'latest' or 'best'")
    return parser


@contextlib.contextmanager
def _cli_logging(verbose: int) -> Iterator[None]:
    """Library log records as ``ckptstore: warning: ...`` lines on stderr while the command runs (restored after,
    so calling :func:`main` in-process leaves the ``ckptstore`` logger as it found it)."""
    import warnings

    level = logging.WARNING if verbose <= 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ckptstore: %(levelname)s: %(message)s"))
    logger = logging.getLogger("ckptstore")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            if verbose < 2:  # torch's deprecation chatter is not the user's problem here
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def _label(e: BaseException) -> str:
    if isinstance(e, IntegrityError):
        return "verification failed"
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, UsageError | ConfigError):
        return "usage error"
    if isinstance(e, UnsafeCheckpointError):
        return "refused"
    if isinstance(e, CheckpointExistsError):
        return "exists"
    return "error"


_NO_CREDENTIALS = (
    "no S3 credentials found{where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
    '"key" and "secret" in --storage-options'
)


def _translate(e: Exception) -> Exception:
    """Errors of the S3 client libraries that reach the CLI untranslated, as ckptstore's typed errors (the storage
    layer translates what it knows; this is the CLI's last line, so that nothing prints as an internal error)."""
    from .errors import StorageError

    mod = type(e).__module__ or ""
    if not mod.startswith(("botocore", "aiobotocore", "s3fs", "boto3")):
        return e
    name = type(e).__name__
    detail = _one_line(str(e))
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "CredentialRetrievalError"):
        out: Exception = StorageError(_NO_CREDENTIALS.format(where=f" ({detail})" if detail else ""))
    elif name == "ClientError":
        resp = getattr(e, "response", None)
        err = resp.get("Error") if isinstance(resp, dict) else None
        code = str(err.get("Code", "")) if isinstance(err, dict) else ""
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            out = CheckpointNotFoundError(f"{detail}: check the bucket and prefix of the URL")
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken"):
            out = StorageError(f"S3 refused access ({code}): {detail}; check the credentials and the bucket policy")
        else:
            out = StorageError(f"S3 error: {detail}")
    else:
        out = StorageError(
            f"S3 client error ({name}): {detail}; check the URL, --storage-options (endpoint_url, region) and network"
        )
    out.__cause__ = e
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to ``sys.exit``).

    Example::

        from ckptstore.cli import main
        code = main(["verify", "./checkpoints", "--json"])
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    verbose = int(getattr(args, "verbose", 0) or 0)
    ui = Ui(plain=bool(getattr(args, "plain", False)), progress=not getattr(args, "no_progress", False),
            verbose=verbose)  # fmt: skip
    prog = f"ckptstore {args.command}"
    with _cli_logging(verbose):
        try:
            return int(args.func(args, ui))
        except KeyboardInterrupt:
            ui.err(f"{prog}: interrupted")
            return 130
        except BrokenPipeError:
            # Output piped into `head` & co: stop quietly.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK
        except Exception as raised:
            e = _translate(raised)
            code = _error_code(e)
            if isinstance(e, CheckpointError | OSError | UsageError):
                text = getattr(e, "cli_message", None) or str(e)  # the CLI's flags instead of Python parameters
                ui.err(f"{prog}: {_label(e)}: {_one_line(text) or type(e).__name__}")
            else:
                ui.err(
                    f"{prog}: internal error: {type(e).__name__}: {_one_line(str(e))}"
                    + ("" if verbose else " (run with -v for the traceback)")
                )
            if verbose:
                traceback.print_exc()
            return code


__all__ = ["EXIT_ERROR", "EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
