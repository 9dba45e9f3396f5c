"""Smoke tests of ``benchmarks/ranks.py`` (issue #16 item 6): the multi-process save/restore benchmark runs real
gloo ranks at the tiniest size, records its measurements in the documented structure, checks every restore
byte for byte (and fails the run when a restored byte differs), and counts S3 GET bytes per job."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.ranks import compare_states, flat_tensors

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "res" / "ranks.json"
    cmd = [sys.executable, "-m", "benchmarks.ranks", "--mib", "0.5", "--layers", "2", "--rounds", "1"]
    cmd += ["--out", str(out), "--dir", str(tmp_path / "data"), "--timeout", "200", *args]  # a later --rounds wins
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, out


def _state_bytes(rows: int, layers: int) -> int:
    # weight, exp_avg, exp_avg_sq (fp32 [rows, 1024]) and a 0-dim fp32 step per layer
    return layers * (3 * rows * 1024 * 4 + 4)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ranks_benchmark_local_records_exact_restores(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "--ranks", "1,2", "--mode", "ddp,fsdp2", "--target", "local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert "| target | mode | ranks |" in md and "| local | fsdp2 | 2 |" in md
    rows = doc["results"]
    assert [(r["target"], r["mode"], r["world"]) for r in rows] == [
        ("local", "ddp", 1),
        ("local", "ddp", 2),
        ("local", "fsdp2", 1),
        ("local", "fsdp2", 2),
    ]
    for r in rows:
        full = _state_bytes(r["rows"], r["layers"])
        assert r["tensor_bytes"] == full
        assert r["ckpt_bytes"] >= full  # shard files: the tensors plus their headers
        save = r["save"]["summary"]
        assert save["seconds"]["median"] > 0 and save["rss_peak_max"] > 0
        assert set(r["restore"]) == {"true", "false"}
        for variant in r["restore"].values():
            (rnd,) = variant["rounds"]
            assert len(rnd["rank_seconds"]) == r["world"] and rnd["seconds"] == max(rnd["rank_seconds"])
            assert rnd["exact"] is True and variant["summary"]["exact"] is True
            assert rnd["equal_before"] == 0  # the re-initialised model differed in every element before
            # Every rank compared every byte it holds: DDP the whole state; FSDP2 its shards (together the whole
            # state once) and its own copy of every 0-dim step.
            want = r["world"] * full if r["mode"] == "ddp" else full + (r["world"] - 1) * 4 * r["layers"]
            assert rnd["compared_bytes"] == want
            assert rnd["compared_tensors"] == r["world"] * 4 * r["layers"]
        if r["world"] == 2 and r["mode"] == "ddp":
            # Read once: the owners send the replicated bytes to the peer over the process group.
            once = r["restore"]["true"]["rounds"][0]
            assert once["pg_bytes_sent_job"] >= full


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ranks_benchmark_fails_when_a_restored_byte_differs(tmp_path: Path) -> None:
    # Test hook: rank 1 flips one bit of one restored tensor before the comparison.
    proc, out = _run(tmp_path, "--ranks", "2", "--mode", "ddp", "--target", "local", "--corrupt-rank", "1")
    assert proc.returncode != 0
    assert "IntegrityError" in proc.stderr and "not bit-exact" in proc.stderr, proc.stderr[-3000:]
    assert "rank 1: step 1 restored with read_once=" in proc.stderr
    assert not out.exists()


@pytest.mark.distributed
@pytest.mark.s3
@pytest.mark.timeout(300)
def test_ranks_benchmark_s3_counts_get_bytes_per_job(tmp_path: Path) -> None:
    # Two rounds: each restores its own step, whose shard files have other names than the first step's.
    proc, out = _run(tmp_path, "--ranks", "2", "--mode", "ddp", "--target", "s3", "--rounds", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["ckpt_bytes"] > r["tensor_bytes"]  # the shard files also hold their headers (not read on restore)
    for i in range(2):
        once, direct = (r["restore"][k]["rounds"][i] for k in ("true", "false"))
        assert once["exact"] and direct["exact"]
        # Read once: every stored tensor byte once per job; every rank reading for itself: twice.
        assert once["get_bytes_shards"] == r["tensor_bytes"] and math.isclose(once["get_x_ckpt"], 1.0)
        assert direct["get_bytes_shards"] == 2 * r["tensor_bytes"] and math.isclose(direct["get_x_ckpt"], 2.0)
        assert 0 < once["get_bytes_other"] < r["tensor_bytes"]  # manifests only
        assert once["gets"] == once["requests_by_op"]["GetObject"] > 0
        assert r["save"]["rounds"][i]["requests_by_op"].get("PutObject", 0) > 0
    assert math.isclose(r["restore"]["true"]["summary"]["get_x_ckpt"], 1.0)
    assert "| ddp | 2 |" in out.with_suffix(".md").read_text()


def test_compare_states_is_bitwise() -> None:
    a = {"x": torch.tensor([1.0, float("nan"), 0.0]), "s": torch.tensor(3.0)}
    same = {"x": torch.tensor([1.0, float("nan"), 0.0]), "s": torch.tensor(3.0)}
    assert compare_states(a, same) == ([], 2, 16)
    neg_zero = {"x": torch.tensor([1.0, float("nan"), -0.0]), "s": torch.tensor(3.0)}
    assert compare_states(a, neg_zero)[0] == ["x"]  # equal as numbers, not as bytes
    assert compare_states(a, {"x": a["x"].double(), "s": a["s"]})[0] == ["x"]
    assert compare_states(a, {"x": a["x"]})[0] == ["s"]
    nested: Any = {"model": {"w": a["x"]}, "optim": {"state": {0: {"step": a["s"]}}}}
    assert sorted(flat_tensors(nested)) == ["model/w", "optim/state/0/step"]
