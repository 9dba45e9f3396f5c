"""Hostile manifests (issue 14): forged with a *valid* self-checksum, end to end through the manager.

- a tensor row with a quantized / packed dtype (``quint4x2``, ``quint2x4``, ``qint32``, ``qint8``): before, the
  reader sized reads from ``numel * itemsize`` while torch allocated less (heap overflow: SIGSEGV/SIGABRT in
  ``restore``/``load(mmap_load=False)``/``export``; ``verify`` said OK). Now ``ManifestError`` everywhere, in a
  child process so that a crash is seen as one;
- pieces that do not cover their tensor (none, overlapping boxes): before, ``load`` returned uninitialised memory
  and ``restore`` left stale values, reported as success. Now ``ManifestError``; ``latest`` falls back;
- one bad entry never blocks resume: a bit flip in a file name (integrity is checked before safety), a step
  directory spelled with 13 digits or Unicode digits, ``created_at`` = 10**400 — ``restore("latest")`` falls
  back to the previous good step instead of raising;
- the writer refuses what the reader refuses (size cap, JSON budget, dtypes), and running out of memory while
  parsing is a ``ManifestError``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore.format.manifest as mf
from ckptstore import IOOptions
from ckptstore.errors import ManifestError, UnsafeCheckpointError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.transfer import verify_step
from tests.faults.conftest import Backend, assert_state, io_options, make_state, zeros_like_state
from tests.faults.forge import resign, sign

pytestmark = [pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
M2 = f"{step_dir(2)}/{MANIFEST_NAME}"


def _two_steps(b: Backend, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    mgr = b.manager(**kw)
    s1, s2 = make_state(1), make_state(2)
    mgr.save(1, s1)
    mgr.save(2, s2, metrics={"loss": 0.5})
    return s1, s2


def _latest_falls_back(b: Backend, s1: dict[str, Any]) -> None:
    target = zeros_like_state(s1)
    assert b.manager().restore(target).step == 1
    assert_state(target, s1)


# -- 1. dtypes ------------------------------------------------------------------------------------------------
DTYPE_CHILD = r"""
import json, sys, torch
from ckptstore import CheckpointManager, IOOptions
from ckptstore.cli import main
from ckptstore.errors import CheckpointError
from ckptstore.transfer import verify_step
from tests.faults.conftest import make_state, zeros_like_state
root, out_dir = sys.argv[1:3]

def run(name, fn):
    try:
        res = fn()
        outcome = "ok" if getattr(res, "ok", True) is not False else "problems"
        if isinstance(res, int) and not isinstance(res, bool):
            outcome = f"exit {res}"
    except CheckpointError as e:
        outcome = type(e).__name__
    except BaseException as e:
        outcome = f"untyped {type(e).__name__}: {e}"
    print(json.dumps({"call": name, "outcome": outcome}), flush=True)

s1 = make_state(1)
mgr = lambda **kw: CheckpointManager(root, **kw)
run("load mmap_load=False", lambda: mgr(io=IOOptions(mmap_load=False)).load(2))
run("load", lambda: mgr().load(2))
run("restore step 2", lambda: mgr().restore(zeros_like_state(s1), step=2, strict=False))
run("verify_step", lambda: verify_step(mgr().storage, 2))
run("export .pt", lambda: main(["export", root, "2", out_dir + "/o.pt"]))
run("export .safetensors", lambda: main(["export", root, "2", out_dir + "/o.safetensors"]))
t = zeros_like_state(s1)
run("restore latest", lambda: print(json.dumps({"latest": mgr().restore(t).step}), flush=True))
print(json.dumps({"latest_is_step_1": all(torch.equal(a, b) for a, b in zip(
    [t["model"][k] for k in sorted(t["model"])], [s1["model"][k] for k in sorted(s1["model"])]))}), flush=True)
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["quint4x2", "quint2x4", "qint32", "qint8"])
def test_quantized_dtype_in_a_manifest_is_refused_not_a_heap_overflow(tmp_path: Path, dtype: str) -> None:
    b = Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
    _two_steps(b)
    doc = json.loads(b.read(M2))
    key = "model/layer0.weight"  # float32 [64, 256]: 65536 bytes
    itemsize = getattr(torch, dtype).itemsize
    doc["tensors"][key].update(dtype=dtype, shape=[65536 // itemsize])  # consistent in itself: 65536 bytes
    b.write(M2, sign(doc))
    proc = subprocess.run(
        [sys.executable, "-c", DTYPE_CHILD, b.url, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=REPO,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"child died with {proc.returncode} after {rows}: {proc.stderr[-2000:]}"
    got = {r["call"]: r["outcome"] for r in rows if "call" in r}
    for call in ("load mmap_load=False", "load", "restore step 2"):
        assert got[call] == "ManifestError", (call, got)
    assert got["verify_step"] == "problems", got
    assert got["export .pt"] != "exit 0" and got["export .safetensors"] != "exit 0", got
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "o.safetensors").exists()
    assert got["restore latest"] == "ok" and {"latest": 1} in rows and rows[-1] == {"latest_is_step_1": True}, rows


# -- 2. coverage ------------------------------------------------------------------------------------------------
def _chunked(b: Backend) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    io = io_options(chunk_bytes=64 * 1024)  # "big" (512 KiB) is written in 8 dim-0 chunks
    s1, s2 = make_state(1, big=False), make_state(2, big=False)
    s1["big"], s2["big"] = torch.randn(512, 256), torch.randn(512, 256)  # 512 KiB: 8 dim-0 chunks
    mgr = b.manager(io=io)
    mgr.save(1, s1)
    mgr.save(2, s2)
    doc = json.loads(b.read(M2))
    assert len(doc["tensors"]["big"]["pieces"]) == 8
    return s1, s2, doc


@pytest.mark.parametrize("case", ["no pieces", "overlapping chunks", "chunk twice"])
def test_pieces_that_do_not_cover_the_tensor_are_refused(backend: Backend, case: str) -> None:
    s1, s2, doc = _chunked(backend)
    pieces = doc["tensors"]["big"]["pieces"]
    if case == "no pieces":
        pieces.clear()
    elif case == "overlapping chunks":  # chunk 3 replaced by chunk 2 (same bytes): rows of chunk 3 never read
        pieces[3] = dict(pieces[2])
    else:  # an extra copy of chunk 0 in place of chunk 7
        pieces[7] = dict(pieces[0])
    backend.write(M2, sign(doc))
    fresh = backend.manager()
    with pytest.raises(ManifestError, match="pieces overlap"):
        fresh.load(2)
    target = zeros_like_state(s2)
    with pytest.raises(ManifestError):
        fresh.restore(target, step=2)
    assert_state(target, zeros_like_state(s2))  # refused before a byte was written
    assert not verify_step(fresh.storage, 2).ok
    _latest_falls_back(backend, s1)


# -- 3. one bad entry never blocks resume -----------------------------------------------------------------------
def test_bit_flip_in_a_file_name_falls_back_a_forged_one_is_refused(backend: Backend) -> None:
    s1, _ = _two_steps(backend)
    good = backend.read(M2)
    pos = good.index(b'"file":"shard-') + len(b'"file":"shard-')
    pos = good.index(b".safetensors", pos)
    flipped = good[:pos] + b"/" + good[pos + 1 :]  # '.' ^ 0x01: one bit, and now a path
    backend.write(M2, flipped)
    fresh = backend.manager()
    with pytest.raises(ManifestError, match="checksum"):  # damage, not an attack
        fresh.load(2)
    _latest_falls_back(backend, s1)
    backend.write(M2, resign(flipped))  # the same path with a valid checksum: hostile, refused loudly
    with pytest.raises(UnsafeCheckpointError):  # (asked for by number: the fallback above quarantined step 2)
        backend.manager().load(2)
    with pytest.raises(UnsafeCheckpointError):
        backend.manager().restore(zeros_like_state(s1), step=2)


def test_non_canonical_step_dirs_are_not_steps(backend: Backend) -> None:
    _, s2 = _two_steps(backend)
    files = [f for f in backend.files() if f.startswith(f"{step_dir(2)}/")]
    # Copies of step 2 as step 3 (13 digits) and step 5 (Arabic-Indic digits), manifests re-signed.
    for fake, n in [("step-0000000000003", 3), ("step-" + "\u0660" * 11 + "\u0665", 5)]:
        for f in files:
            data = backend.read(f)
            if f.endswith(MANIFEST_NAME):
                doc = json.loads(data)
                doc["step"] = n
                data = sign(doc)
            backend.write(f"{fake}/{f.split('/', 1)[1]}", data)
    mgr = backend.manager()
    assert mgr.steps() == [1, 2]
    assert [i.step for i in mgr.history()] == [1, 2]
    target = zeros_like_state(s2)
    assert mgr.restore(target).step == 2
    assert_state(target, s2)
    assert mgr.gc(min_age_seconds=0) == []  # not a step: not ours to clean either


@pytest.mark.parametrize("value", [b"10" + b"0" * 400, b"1e400"], ids=["10**400", "1e400"])
def test_out_of_range_created_at_falls_back(backend: Backend, value: bytes) -> None:
    s1, _ = _two_steps(backend)
    raw = backend.read(M2)
    start = raw.index(b'"created_at":') + len(b'"created_at":')
    forged = resign(raw[:start] + value + raw[raw.index(b",", start) :])
    backend.write(M2, forged)
    fresh = backend.manager()
    with pytest.raises(ManifestError, match="created_at"):
        fresh.info(2)
    assert [i.step for i in fresh.history()] == [1]
    _latest_falls_back(backend, s1)


def test_odd_metrics_parse_and_do_not_block_resume(backend: Backend) -> None:
    _, s2 = _two_steps(backend)
    raw = backend.read(M2)
    forged = resign(raw.replace(b'"metrics":{"loss":0.5}', b'"metrics":{"loss":1' + b"0" * 400 + b',"x":1e999}'))
    backend.write(M2, forged)
    fresh = backend.manager()
    m = fresh.info(2).metrics
    assert m["loss"] == 10**400 and m["x"] == float("inf")
    target = zeros_like_state(s2)
    assert fresh.restore(target).step == 2
    assert_state(target, s2)


# -- 4. the writer refuses what readers refuse; the parser's memory -----------------------------------------------
def test_save_refuses_a_manifest_readers_would_refuse(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = backend.manager()
    s1 = make_state(1)
    mgr.save(1, s1)
    with pytest.raises(ManifestError, match="memory"):  # a million [] cost ~40x their bytes to parse
        mgr.save(2, make_state(2), metadata={"x": [[]] * 1_000_000})
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ManifestError, match="larger than"):
        mgr.save(3, make_state(3))
    monkeypatch.undo()
    assert mgr.steps() == [1]
    backend.only_committed(mgr, [1])
    _latest_falls_back(backend, s1)


OOM_CHILD = r"""
import json, resource, sys
from benchmarks.manifest_parse import build
from ckptstore.errors import CheckpointError
from ckptstore.format.manifest import Manifest
data = build(32 << 20, 8, 16)
Manifest.from_bytes(build(1 << 16, 8, 16))  # warm
def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
import ctypes, gc
gc.collect()
ctypes.CDLL(None).malloc_trim(0)  # freed heap would otherwise absorb the parse below the limit
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm() + (8 << 20), hard))
try:
    Manifest.from_bytes(data)
    out = "ok"
except CheckpointError as e:
    out = f"{type(e).__name__}: {e}"
except BaseException as e:
    out = f"untyped {type(e).__name__}"
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
print(json.dumps({"outcome": out}))
"""


@pytest.mark.timeout(120)
def test_out_of_memory_while_parsing_is_a_manifest_error() -> None:
    proc = subprocess.run([sys.executable, "-c", OOM_CHILD], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])["outcome"]
    assert out.startswith("ManifestError") and "memory" in out, out


def test_storable_dtypes_round_trip(backend: Backend) -> None:
    # Every dtype the reader accepts is one save writes (and reads back bit-exact): the two lists agree.
    from ckptstore.format.state import STORABLE_DTYPES

    state = {}
    for name, dt in STORABLE_DTYPES.items():
        raw = torch.randint(0, 256, (6 * dt.itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        state[name] = raw.view(dt)
    mgr = backend.manager(io=IOOptions(mmap_load=False))
    mgr.save(1, state)
    got = backend.manager().load(1)
    for name in state:
        assert got[name].dtype == state[name].dtype
        assert torch.equal(got[name].view(torch.uint8), state[name].view(torch.uint8)), name
