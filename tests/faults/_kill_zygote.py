"""Fork server for the seeded SIGKILL rows: imports torch and ckptstore once, then forks one process per seed.

    python _kill_zygote.py CONFIG.json  ->  one JSON line per seed on stdout, then "DONE"

Starting a Python interpreter with torch costs ~2 s here; a fork of this warmed-up process costs milliseconds,
so a CI run affords many real SIGKILLs. Each seed runs in its own process (a SIGKILL ends it, there is no second
kill per process) on its own root ``<base>/seed-NNNN``. Nothing S3- or thread-related is created in this
process before forking; torch runs single-threaded.

Modes (``config["mode"]``):

- ``single``: commit step 1, then save step 2 with a :class:`~tests.fixtures.faulty.FaultyStorage` that
  SIGKILLs the process at a seeded point: the K-th storage event (K uniform over the events a full save makes,
  measured by a dry run), or after B bytes of a write (B uniform over the bytes a save writes, so inside a
  write), or at a seeded time (uniform over the dry run's duration, so anywhere, commit internals included).
- ``ranks2``: the same on 2 ranks (gloo over a TCPStore hosted here): the seed picks the victim rank too; the
  survivor must raise ``DistributedSaveError`` (or succeed if the step committed) in bounded time.
- ``retention``: ``keep_last=2``; save steps 1..5 and SIGKILL at a seeded deletion made by retention (the
  manifest removal, the dir sync, the data removal, or half-way through the data removal).

Each seed's process appends lines to ``<status_dir>/seed-NNNN`` as it goes ("C1" = step 1 committed, "PLAN ...",
"R {json}" = a rank's outcome); the parent test reads them and checks the root.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Any

import torch

torch.set_num_threads(1)  # before anything runs: a forked child must not inherit a busy OpenMP pool

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT_DIR not in sys.path:
    sys.path.insert(0, ROOT_DIR)

from ckptstore import CheckpointManager, IOOptions  # noqa: E402
from ckptstore.options import MiB  # noqa: E402
from tests.fixtures.faulty import Fault, inject  # noqa: E402

SMALL = 64 * 1024  # bytes per small tensor


def state(step: int, seed: int, big: bool = False) -> dict[str, Any]:
    """The state saved as ``step`` by ``seed`` (deterministic; the test rebuilds it to compare bit for bit)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    st: dict[str, Any] = {f"t{i}": torch.randn(SMALL // 4 * (1 + i % 3), generator=g) for i in range(6)}
    st["i64"] = torch.randint(-(2**40), 2**40, (257,), generator=g)
    st["meta"] = {"step": step, "seed": seed, "lr": [0.1, float("inf")]}
    if big:
        st["big"] = torch.randn(6 * MiB // 4, generator=g)  # > one 5 MiB S3 part: a multipart upload
    return st


def io_options(threads: int = 2, timeout: float = 600.0, file_bytes: int = 128 * 1024) -> IOOptions:
    # Several small shard files per save (file_bytes), so kills land between files too; 5 MiB S3 parts.
    return IOOptions(
        threads=threads,
        file_bytes=file_bytes,
        min_split_bytes=file_bytes,
        part_bytes=5 * MiB,
        max_inflight_bytes=20 * MiB,
        read_chunk_bytes=1 * MiB,
        timeout_seconds=timeout,
    )


def make_manager(cfg: dict[str, Any], root: str, **kw: Any) -> CheckpointManager:
    io = dict(kw.pop("io", {}))
    if str(cfg["base"]).startswith("s3://"):
        io.setdefault("file_bytes", 320 * 1024)  # fewer, larger files on S3: each request costs ~15 ms on moto
    return CheckpointManager(root, storage_options=cfg.get("storage_options") or None, io=io_options(**io), **kw)


def note(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _timer_kill(delay: float) -> None:
    import threading

    def fire() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Timer(delay, fire)
    t.daemon = True
    t.start()


def pick_kill(rng: random.Random, dry: dict[str, Any]) -> tuple[str, list[Fault], float | None]:
    """A seeded kill point inside a save whose dry run made ``dry['events']`` events and wrote ``dry['bytes']``."""
    kind = rng.choices(["event", "bytes", "time"], weights=[45, 35, 20])[0]
    if kind == "event":
        k = rng.randint(1, dry["events"])
        return f"event {k}/{dry['events']}", [Fault("kill", nth=k)], None
    if kind == "bytes":
        b = rng.randrange(dry["bytes"])
        return f"bytes {b}/{dry['bytes']}", [Fault("kill", after_bytes=b)], None
    t = rng.uniform(0.0, dry["seconds"] * 1.1)
    return f"time {t:.4f}s/{dry['seconds']:.4f}s", [], t


# -- one seed ------------------------------------------------------------------------------------------------
def run_single(cfg: dict[str, Any], seed: int, status: str) -> None:
    rng = random.Random(seed)
    big = bool(cfg.get("big_every")) and seed % cfg["big_every"] == 0
    dry = cfg["dry"]["big" if big else "small"]
    root = f"{cfg['base']}/seed-{seed:04d}"
    mgr = make_manager(cfg, root)
    mgr.save(1, state(1, seed, big), epoch=1, metrics={"loss": 1.0})
    note(status, "C1")
    desc, faults, delay = pick_kill(rng, dry)
    fs = inject(mgr, *faults)
    note(status, f"PLAN {desc} big={big}")
    if delay is not None:
        _timer_kill(delay)
    mgr.save(2, state(2, seed, big), epoch=2, metrics={"loss": 0.5})
    note(status, f"C2 events={len(fs.events)}")
    if delay is not None:
        time.sleep(max(0.0, delay + 0.05))  # let a late timer fire; either outcome is valid
    note(status, "END")


def run_dry(cfg: dict[str, Any], variant: str, status: str) -> None:
    root = f"{cfg['base']}/dry-{variant}"
    mgr = make_manager(cfg, root)
    mgr.save(1, state(1, 0, variant == "big"))
    fs = inject(mgr)
    t0 = time.perf_counter()
    mgr.save(2, state(2, 0, variant == "big"))
    dt = time.perf_counter() - t0
    note(status, json.dumps({"events": len(fs.events), "bytes": fs.written, "seconds": dt}))


def run_rank(cfg: dict[str, Any], seed: int, rank: int, status: str) -> None:
    import datetime as dt

    import torch.distributed as dist

    from ckptstore.errors import DistributedSaveError

    rng = random.Random(seed)
    victim = rng.randrange(2)
    dry = cfg["dry"][f"rank{victim}"]
    timeout = float(cfg.get("timeout", 5.0))
    store = dist.TCPStore("127.0.0.1", cfg["store_port"], 2, is_master=False, timeout=dt.timedelta(seconds=30))
    pstore = dist.PrefixStore(f"seed-{seed}", store)
    dist.init_process_group("gloo", store=pstore, rank=rank, world_size=2, timeout=dt.timedelta(seconds=timeout))
    root = f"{cfg['base']}/seed-{seed:04d}"
    mgr = make_manager(cfg, root, io={"timeout": timeout})
    mgr.save(1, state(1, seed), epoch=1)
    if rank == 0:
        note(status, "C1")
    fs = inject(mgr)
    delay = None
    if rank == victim and cfg.get("fault") == "enospc":
        k = rng.randint(1, dry["commit_events"])
        desc, faults = f"enospc at event {k}/{dry['events']}", [Fault("enospc", nth=k)]
        fs.add(*faults)
        note(status, f"PLAN victim={victim} {desc}")
    elif rank == victim:
        desc, faults, delay = pick_kill(rng, dry)
        fs.add(*faults)
        note(status, f"PLAN victim={victim} {desc}")
        if delay is not None:
            _timer_kill(delay)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"rank": rank, "victim": victim}
    try:
        mgr.save(2, state(2, seed), epoch=2)
        out["error"] = None
    except DistributedSaveError as e:
        out.update(error="DistributedSaveError", failed_ranks=sorted(e.failed_ranks), message=str(e)[:500])
    except Exception as e:  # anything else is a finding: the test reports it
        out.update(error=type(e).__name__, message=str(e)[:500])
    out["seconds"] = time.perf_counter() - t0
    if delay is not None and rank == victim:
        time.sleep(max(0.0, delay + 0.05))
    note(status, "R " + json.dumps(out))


def run_rank_dry(cfg: dict[str, Any], rank: int, status: str) -> None:
    import datetime as dt

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", cfg["store_port"], 2, is_master=False, timeout=dt.timedelta(seconds=30))
    pstore = dist.PrefixStore("dry", store)
    dist.init_process_group("gloo", store=pstore, rank=rank, world_size=2, timeout=dt.timedelta(seconds=30))
    mgr = make_manager(cfg, f"{cfg['base']}/dry", io={"timeout": 30.0})
    mgr.save(1, state(1, 0))
    fs = inject(mgr)
    t0 = time.perf_counter()
    mgr.save(2, state(2, 0))
    # Events after the commit (removing the save's in-progress lease) cannot fail a committed save: ENOSPC is
    # injected only up to the commit.
    commits = [i + 1 for i, ev in enumerate(fs.events) if ev.op == "create_exclusive"]
    note(status, json.dumps({"rank": rank, "events": len(fs.events), "bytes": max(1, fs.written),
                             "commit_events": commits[-1] if commits else len(fs.events),
                             "seconds": time.perf_counter() - t0}))  # fmt: skip


RETENTION_STEPS = 5


def run_retention(cfg: dict[str, Any], seed: int, status: str) -> None:
    rng = random.Random(seed)
    root = f"{cfg['base']}/seed-{seed:04d}"
    mgr = make_manager(cfg, root, retention={"keep_last": 2})
    fs = inject(mgr)
    deletions = cfg["dry"]["deletions"]
    k = rng.randint(1, deletions)
    how = rng.choice(["kill", "half"])
    seen = {"n": 0}

    def on_delete(ev: Any) -> None:
        if not in_retention["on"]:
            return
        seen["n"] += 1
        if seen["n"] != k:
            return
        if how == "half" and ev.op == "remove_tree":
            # Half of the step's files are gone when the kill lands (a kill in the middle of rmtree/DeleteObjects).
            names = sorted(fs.inner.list_dir(ev.rel))
            for name in names[: len(names) // 2]:
                fs.inner.remove(f"{ev.rel}/{name}")
        os.kill(os.getpid(), signal.SIGKILL)

    in_retention = {"on": False}
    orig = mgr.catalog.apply_retention  # retention after a commit: ckptstore.catalog.Catalog.apply_retention

    def apply(policy: Any, committed: int, protect: set[int]) -> Any:
        in_retention["on"] = True
        try:
            return orig(policy, committed, protect)
        finally:
            in_retention["on"] = False

    mgr.catalog.apply_retention = apply  # type: ignore[method-assign]
    for op in ("remove", "remove_tree", "sync_dir"):
        fs.add(Fault("call", op=op, times=None, fn=on_delete))
    note(status, f"PLAN deletion {k}/{deletions} {how}")
    for step in range(1, RETENTION_STEPS + 1):
        mgr.save(step, state(step, seed), epoch=step)
        note(status, f"C{step}")
    note(status, "END")


def run_retention_dry(cfg: dict[str, Any], status: str) -> None:
    mgr = make_manager(cfg, f"{cfg['base']}/dry", retention={"keep_last": 2})
    fs = inject(mgr)
    for step in range(1, RETENTION_STEPS + 1):
        mgr.save(step, state(step, 0), epoch=step)
    # Deletions by retention only (a successful save makes no remove/remove_tree call; sync_dir before the
    # commit is excluded by counting only the ones inside _delete_in: those follow a manifest removal).
    n, armed = 0, False
    for e in fs.events:
        if e.op == "remove" and e.rel.endswith("/manifest.json"):
            armed = True
        if armed and e.op in ("remove", "remove_tree", "sync_dir"):
            n += 1
        if e.op == "remove" and e.rel.startswith("pins/"):
            armed = False
    note(status, json.dumps({"deletions": n}))


# -- fork plumbing --------------------------------------------------------------------------------------------
def fork(fn: Any, *args: Any) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException as e:
            import traceback

            note(args[-1], "EXC " + json.dumps(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            code = 3
        finally:
            os._exit(code)
    return pid


def wait_all(pids: dict[int, Any], deadline: float) -> dict[Any, int]:
    """Wait for every child (``pid -> tag``); SIGKILL stragglers at ``deadline`` (recorded as 'hung')."""
    codes: dict[Any, int] = {}
    while pids:
        for pid in list(pids):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                codes[pids.pop(pid)] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if pids and time.monotonic() > deadline:
            for pid, tag in list(pids.items()):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                codes[tag] = 999  # hung: killed by the zygote
                pids.pop(pid)
        if pids:
            time.sleep(0.005)
    return codes


def read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def warm_up(cfg_is_s3: bool) -> None:
    """Import lazily imported modules here once, so no forked child pays for them (~0.6 s each otherwise)."""
    import importlib

    for mod in ("torch.distributed.tensor", "ckptstore.retention", "ckptstore.transfer"):
        importlib.import_module(mod)  # imported lazily by every save / retention / gc

    if cfg_is_s3:
        # Parse the S3 service model once (~0.3 s): the data path's botocore session is shared per process.
        # Creating a client opens no connection and starts no thread; s3fs (which starts an event-loop thread)
        # is only imported here, never instantiated.
        import s3fs  # noqa: F401

        from ckptstore.storage import s3 as s3mod

        with s3mod._SESSIONS_LOCK:
            session = s3mod._SESSIONS.setdefault(None, __import__("botocore.session").session.Session())
        session.create_client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                              aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
    mgr = CheckpointManager("memory://ckptstore-zygote-warm-up", io=IOOptions(threads=1))
    mgr.save(1, state(1, 0))
    mgr.load(1)
    mgr.restore({"t0": torch.zeros(SMALL // 4)}, strict=False)
    mgr.gc(min_age_seconds=0)
    mgr.close()


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    warm_up(str(cfg["base"]).startswith("s3://"))
    status_dir = cfg["status_dir"]
    mode = cfg["mode"]
    per_seed_timeout = float(cfg.get("per_seed_timeout", 60.0))
    parallel = int(cfg.get("parallel", 2))
    store = None
    if mode == "ranks2":
        import datetime as dt

        import torch.distributed as dist

        store = dist.TCPStore(
            "127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=dt.timedelta(seconds=60)
        )
        cfg["store_port"] = store.port
    # Dry runs, each in a forked child too (this process stays free of threads, clients and event loops).
    cfg["dry"] = {}
    if mode == "single":
        variants = ["small"] + (["big"] if cfg.get("big_every") else [])
        for v in variants:
            st = os.path.join(status_dir, f"dry-{v}")
            code = wait_all({fork(run_dry, cfg, v, st): v}, time.monotonic() + per_seed_timeout)[v]
            lines = read_lines(st)
            if code != 0 or not lines:
                print(json.dumps({"dry_failed": v, "code": code, "lines": lines}), flush=True)
                return
            cfg["dry"][v] = json.loads(lines[-1])
    elif mode == "ranks2":
        sts = [os.path.join(status_dir, f"dry-rank{r}") for r in range(2)]
        codes = wait_all({fork(run_rank_dry, cfg, r, sts[r]): r for r in range(2)}, time.monotonic() + 60)
        for r in range(2):
            lines = read_lines(sts[r])
            if codes[r] != 0 or not lines:
                print(json.dumps({"dry_failed": f"rank{r}", "code": codes[r], "lines": lines}), flush=True)
                return
            cfg["dry"][f"rank{r}"] = json.loads(lines[-1])
    elif mode == "retention":
        st = os.path.join(status_dir, "dry")
        code = wait_all({fork(run_retention_dry, cfg, st): 0}, time.monotonic() + per_seed_timeout)[0]
        lines = read_lines(st)
        if code != 0 or not lines:
            print(json.dumps({"dry_failed": "retention", "code": code, "lines": lines}), flush=True)
            return
        cfg["dry"] = json.loads(lines[-1])
    print(json.dumps({"dry": cfg["dry"]}), flush=True)

    seeds = list(cfg["seeds"])
    running: dict[int, Any] = {}
    started: dict[Any, float] = {}

    def report(tag: Any, code: int) -> None:
        seed = tag[0]
        lines = read_lines(os.path.join(status_dir, f"seed-{seed:04d}"))
        print(json.dumps({"seed": seed, "proc": tag[1], "code": code, "lines": lines,
                          "seconds": time.monotonic() - started[tag]}), flush=True)  # fmt: skip

    while seeds or running:
        while seeds and len({t[0] for t in running.values()}) < parallel:
            seed = seeds.pop(0)
            st = os.path.join(status_dir, f"seed-{seed:04d}")
            if mode == "single":
                tags = {fork(run_single, cfg, seed, st): (seed, 0)}
            elif mode == "retention":
                tags = {fork(run_retention, cfg, seed, st): (seed, 0)}
            else:
                tags = {fork(run_rank, cfg, seed, r, st): (seed, r) for r in range(2)}
            for pid, tag in tags.items():
                running[pid] = tag
                started[tag] = time.monotonic()
        for pid in list(running):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                tag = running.pop(pid)
                report(tag, -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        now = time.monotonic()
        for pid, tag in list(running.items()):
            if now - started[tag] > per_seed_timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                running.pop(pid)
                report(tag, 999)
        time.sleep(0.003)
    print("DONE", flush=True)
    del store


if __name__ == "__main__":
    main()
