"""SIGKILL at seeded random points of a save, many seeds: file://, s3:// (moto) and 2 ranks.

Every seed is a real process killed with a real SIGKILL (see ``_kill_zygote.py`` for how the kill point is
chosen: a storage event, a byte offset inside a write, or a time). Afterwards, from a fresh manager:

- no committed step is lost: step 1 (committed before the kill) and step 2 if its save returned are visible
  and load bit-exact; ``restore("latest")`` gives the newest visible step;
- no partial step is visible: ``steps()`` only lists {1, 2}, and whatever a visible step 2 has is complete;
- ``gc`` leaves exactly the committed steps' files (no partial step dir, no stray shard, no incomplete S3
  multipart upload);
- with 2 ranks, the surviving rank raises ``DistributedSaveError`` (or returns if the step did commit) within
  the collective timeout: no hang.

The default run has 60 seeds per backend (plus 24 for 2 ranks); ``-m slow`` runs the long soak (600 / 200).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from tests.faults.conftest import Backend
from tests.fixtures.dist import assert_bit_equal
from tests.fixtures.s3 import BUCKET

ZYGOTE = Path(__file__).with_name("_kill_zygote.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.faults]

SEEDS_SINGLE = 60
SEEDS_S3 = 50
SEEDS_RANKS = 24
SEEDS_RANKS_S3 = 4
SEEDS_RETENTION = 24
SEEDS_ENOSPC_RANKS = 8
SEEDS_RETENTION_S3 = 8
SOAK_SINGLE = 600
SOAK_RANKS = 200


def _zygote_state():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckpt_kill_zygote", ZYGOTE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Z = _zygote_state()


def run_zygote(tmp_path: Path, cfg: dict[str, Any], timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    status = tmp_path / "status"
    status.mkdir(exist_ok=True)
    cfg = {**cfg, "status_dir": str(status)}
    cfg_path = tmp_path / "zygote.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(ZYGOTE), str(cfg_path)], capture_output=True, text=True, timeout=timeout, env=env
    )
    out = proc.stdout.splitlines()
    assert proc.returncode == 0 and out and out[-1] == "DONE", (proc.returncode, out[-5:], proc.stderr[-3000:])
    head = json.loads(out[0])
    assert "dry" in head, head
    recs = [json.loads(line) for line in out[1:-1]]
    for r in recs:  # the whole story of the seed (every process of it has ended now)
        r["lines"] = (status / f"seed-{r['seed']:04d}").read_text().splitlines()
    return head["dry"], recs


def _committed(lines: list[str]) -> set[int]:
    return {int(line.split()[0][1:]) for line in lines if line[:1] == "C" and line.split()[0][1:].isdigit()}


def all_files(url: str, s3_client: Any = None) -> list[str]:
    """Every file/object under the root, relative to it (one listing request on S3)."""
    if url.startswith("s3://"):
        prefix = url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
        keys: list[str] = []
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [o["Key"][len(prefix) :] for o in page.get("Contents") or ()]
        return sorted(keys)
    base = Path(url.removeprefix("file://"))
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


def check_root(url: str, opts: dict[str, Any] | None, expect_any: set[int], must: set[int], want: Any,
               s3_client: Any = None) -> list[int]:  # fmt: skip
    """The invariants every kill must leave; returns the visible steps."""
    mgr = CheckpointManager(url, storage_options=opts)
    visible = mgr.steps()
    assert must <= set(visible) <= expect_any, f"visible {visible}, committed before the kill {sorted(must)}"
    newest = max(visible)
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in want(newest).items()}
    assert mgr.restore(target).step == newest  # "latest": the newest committed step, verified
    assert_bit_equal(target, want(newest), f"restored step {newest}")
    for s in visible:
        if s != newest:
            assert_bit_equal(mgr.load(s), want(s), f"step {s}")
    mgr.gc(min_age_seconds=0)
    # After gc: exactly the committed steps' files, nothing of the killed attempt.
    expected = sorted(f"{step_dir(s)}/{f}" for s in visible for f in [*mgr.manifest(s).files, MANIFEST_NAME])
    left = [f for f in all_files(url, s3_client) if not f.startswith("pins/")]
    assert left == expected, f"after gc: {sorted(set(left) ^ set(expected))} differ from the committed steps"
    if s3_client is not None:
        prefix = url.split(f"s3://{BUCKET}/", 1)[1] + "/"
        ups = s3_client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads") or []
        assert ups == [], f"incomplete multipart uploads left: {[u['Key'] for u in ups]}"
    mgr.close()
    return visible


def summarize(label: str, rows: list[tuple[str, str]]) -> None:
    c = collections.Counter(rows)
    print(f"\n[{label}] {len(rows)} seeds: " + ", ".join(f"{k}/{v}: {n}" for (k, v), n in sorted(c.items())))


def _single(tmp_path: Path, url: str, opts: dict[str, Any] | None, seeds: range, s3_client: Any = None,
            big_every: int = 0) -> None:  # fmt: skip
    cfg = {"mode": "single", "base": url, "storage_options": opts, "seeds": list(seeds), "parallel": 2,
           "big_every": big_every, "per_seed_timeout": 60}  # fmt: skip
    t0 = time.perf_counter()
    dry, recs = run_zygote(tmp_path, cfg, timeout=120 + 3 * len(seeds))
    t1 = time.perf_counter()
    assert dry["small"]["events"] > 10 and dry["small"]["bytes"] > 0, dry
    assert sorted(r["seed"] for r in recs) == list(seeds)
    rows = []
    for r in sorted(recs, key=lambda r: r["seed"]):
        seed, lines = r["seed"], r["lines"]
        assert not any(line.startswith("EXC") for line in lines), (seed, lines)
        assert "C1" in lines, (seed, r)
        # Killed (-9), or the kill point was past the end of this save (it then completed normally).
        assert r["code"] == -9 or (r["code"] == 0 and "END" in lines), (seed, r)
        big = bool(big_every) and seed % big_every == 0
        plan = next(line for line in lines if line.startswith("PLAN"))
        visible = check_root(
            f"{url}/seed-{seed:04d}",
            opts,
            expect_any={1, 2},
            must=_committed(lines),
            want=lambda s, seed=seed, big=big: Z.state(s, seed, big),
            s3_client=s3_client,
        )
        rows.append((plan.split()[1], "step 2 committed" if 2 in visible else "step 2 absent"))
    summarize(f"SIGKILL {url.split(':')[0]} single process", rows)
    print(f"kills {t1 - t0:.1f}s, checks {time.perf_counter() - t1:.1f}s")


@pytest.mark.timeout(300)
def test_sigkill_random_points_file(tmp_path: Path) -> None:
    _single(tmp_path, f"file://{tmp_path}/ck", None, range(SEEDS_SINGLE))


@pytest.mark.s3
@pytest.mark.timeout(400)
def test_sigkill_random_points_s3(tmp_path: Path, s3_root: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    url, opts = s3_root
    _single(tmp_path, url, opts, range(SEEDS_S3), s3_client=s3_client, big_every=6)


def _ranks(tmp_path: Path, url: str, opts: dict[str, Any] | None, seeds: range, timeout: float = 5.0,
           s3_client: Any = None) -> None:  # fmt: skip
    cfg = {"mode": "ranks2", "base": url, "storage_options": opts, "seeds": list(seeds), "parallel": 1,
           "timeout": timeout, "per_seed_timeout": 3 * timeout + 30}  # fmt: skip
    _, recs = run_zygote(tmp_path, cfg, timeout=120 + (2 * timeout + 10) * len(seeds))
    by_seed: dict[int, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for r in recs:
        by_seed[r["seed"]][r["proc"]] = r
    assert sorted(by_seed) == list(seeds)
    rows = []
    for seed in seeds:
        procs = by_seed[seed]
        lines = procs[0]["lines"]
        plan = next(line for line in lines if line.startswith("PLAN"))
        victim = int(plan.split()[1].split("=")[1])
        outcomes = {json.loads(line[2:])["rank"]: json.loads(line[2:]) for line in lines if line.startswith("R ")}
        assert not any(line.startswith("EXC") for line in lines), (seed, lines)
        for rank in (0, 1):
            assert procs[rank]["code"] != 999, f"seed {seed}: rank {rank} hung ({plan})"
        survivor = 1 - victim
        so = outcomes.get(survivor)
        assert so is not None, f"seed {seed}: the surviving rank {survivor} reported nothing ({plan}, {procs})"
        assert so["error"] in (None, "DistributedSaveError"), (seed, plan, so)
        assert so["seconds"] < 2 * timeout + 5, (seed, plan, so)
        if so["error"] is not None and procs[victim]["code"] == -9:
            # A dead rank is named (when it died before the collective the survivor was waiting in).
            assert so["failed_ranks"] in ([victim], []), (seed, plan, so)
        victim_done = victim in outcomes and outcomes[victim]["error"] is None
        committed = _committed(lines)
        if so["error"] is None and victim_done:
            committed.add(2)
        visible = check_root(
            f"{url}/seed-{seed:04d}", opts, {1, 2}, committed, lambda s, seed=seed: Z.state(s, seed), s3_client
        )
        if so["error"] is None:
            assert 2 in visible, f"seed {seed}: rank {survivor} returned success but step 2 is not committed"
        rows.append((f"victim{victim}-{plan.split()[2]}", "committed" if 2 in visible else "absent"))
    summarize("SIGKILL 2 ranks", rows)


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_sigkill_random_points_two_ranks_file(tmp_path: Path) -> None:
    _ranks(tmp_path, f"file://{tmp_path}/ck", None, range(SEEDS_RANKS))


@pytest.mark.s3
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_sigkill_random_points_two_ranks_s3(
    tmp_path: Path, s3_root: tuple[str, dict[str, Any]], s3_client: Any
) -> None:
    url, opts = s3_root
    _ranks(tmp_path, url, opts, range(SEEDS_RANKS_S3), s3_client=s3_client)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_enospc_at_random_points_two_ranks_file(tmp_path: Path) -> None:
    """ENOSPC (instead of a kill) at a seeded storage event of a seeded rank, rank 0's commit included: every rank
    raises ``DistributedSaveError`` naming the failed rank, step 1 stays, and nothing of step 2 is left even
    before gc (rank 0 removes the files of every rank)."""
    url = f"file://{tmp_path}/ck"
    seeds = range(SEEDS_ENOSPC_RANKS)
    cfg = {"mode": "ranks2", "fault": "enospc", "base": url, "storage_options": None, "seeds": list(seeds),
           "parallel": 1, "timeout": 5.0, "per_seed_timeout": 45}  # fmt: skip
    _, recs = run_zygote(tmp_path, cfg, timeout=120 + 20 * len(seeds))
    by_seed: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in recs:
        by_seed[r["seed"]].append(r)
    rows = []
    for seed in seeds:
        lines = by_seed[seed][0]["lines"]
        assert all(r["code"] == 0 for r in by_seed[seed]), (seed, by_seed[seed])
        plan = next(line for line in lines if line.startswith("PLAN"))
        victim = int(plan.split()[1].split("=")[1])
        outs = [json.loads(line[2:]) for line in lines if line.startswith("R ")]
        assert len(outs) == 2, (seed, lines)
        for o in outs:
            assert o["error"] == "DistributedSaveError" and o["failed_ranks"] == [victim], (seed, plan, o)
            assert "No space left on device" in o["message"], (seed, o)
        b = Backend("file", f"{url}/seed-{seed:04d}", None, path=tmp_path / "ck" / f"seed-{seed:04d}")
        mgr = b.manager()
        assert mgr.steps() == [1]
        assert_bit_equal(mgr.load(1), Z.state(1, seed))
        b.only_committed(mgr, [1])  # cleaned up by the failed save itself
        rows.append((f"rank{victim}", plan.split()[4]))
    summarize("ENOSPC 2 ranks", rows)


# -- kill during retention ---------------------------------------------------------------------------------------
def _retention(tmp_path: Path, url: str, opts: dict[str, Any] | None, seeds: range, s3_client: Any = None) -> None:
    cfg = {"mode": "retention", "base": url, "storage_options": opts, "seeds": list(seeds), "parallel": 2,
           "per_seed_timeout": 60}  # fmt: skip
    dry, recs = run_zygote(tmp_path, cfg, timeout=120 + 5 * len(seeds))
    assert dry["deletions"] >= 3 * (Z.RETENTION_STEPS - 2), dry  # manifest, sync, data (+ pin) per deleted step
    rows = []
    for r in sorted(recs, key=lambda r: r["seed"]):
        seed, lines = r["seed"], r["lines"]
        assert not any(line.startswith("EXC") for line in lines), (seed, lines)
        plan = next(line for line in lines if line.startswith("PLAN"))
        printed = _committed(lines)
        if r["code"] == -9:
            # Killed inside the retention of the save of step n, which runs after step n is committed.
            n = max(printed, default=0) + 1
        else:
            assert r["code"] == 0 and "END" in lines, (seed, r)
            n = Z.RETENTION_STEPS
        keep = {s for s in (n - 1, n) if s >= 1}  # keep_last=2: never deleted; n is the newest verified step
        visible = check_root(f"{url}/seed-{seed:04d}", opts, set(range(1, n + 1)), keep,
                             lambda s, seed=seed: Z.state(s, seed), s3_client)  # fmt: skip
        rows.append((plan.split()[2], f"killed after C{n}, {len(visible)} steps left"))
    summarize(f"SIGKILL during retention ({url.split(':')[0]})", rows)


@pytest.mark.timeout(300)
def test_sigkill_during_retention_file(tmp_path: Path) -> None:
    _retention(tmp_path, f"file://{tmp_path}/ck", None, range(SEEDS_RETENTION))


@pytest.mark.s3
@pytest.mark.timeout(300)
def test_sigkill_during_retention_s3(tmp_path: Path, s3_root: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    url, opts = s3_root
    _retention(tmp_path, url, opts, range(SEEDS_RETENTION_S3), s3_client=s3_client)


# -- long soak ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_sigkill_file(tmp_path: Path) -> None:
    _single(tmp_path, f"file://{tmp_path}/ck", None, range(1000, 1000 + SOAK_SINGLE))


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(3600)
def test_soak_sigkill_s3(tmp_path: Path, s3_root: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    url, opts = s3_root
    _single(tmp_path, url, opts, range(1000, 1000 + SOAK_SINGLE), s3_client=s3_client, big_every=5)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(3600)
def test_soak_sigkill_two_ranks_file(tmp_path: Path) -> None:
    _ranks(tmp_path, f"file://{tmp_path}/ck", None, range(1000, 1000 + SOAK_RANKS))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_sigkill_during_retention_file(tmp_path: Path) -> None:
    _retention(tmp_path, f"file://{tmp_path}/ck", None, range(1000, 1000 + SOAK_RANKS))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.s3
@pytest.mark.timeout(3600)
def test_soak_sigkill_two_ranks_s3(tmp_path: Path, s3_root: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    url, opts = s3_root
    _ranks(tmp_path, url, opts, range(2000, 2000 + SOAK_RANKS // 4), s3_client=s3_client)
