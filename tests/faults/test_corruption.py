"""Corrupted and hostile checkpoints, on file:// and s3://: never loaded silently, always a typed error.

- bit flips in shard data (seeded positions): ``IntegrityError`` naming step/file/key, ``restore("latest")``
  falls back to the previous step bit-exact, ``verify_step`` reports it;
- bit flips in a shard's safetensors header: restores stay bit-exact (they read the manifest's byte ranges and
  check crc32c), ``verify_step``/``ckptstore verify`` report the damaged header;
- bit flips in the manifest (seeded): always a typed error — the manifest's last field is a crc32c of the
  bytes before it, so even a flip that yields another valid manifest is caught;
- empty, truncated, garbage manifests, and 300 seeded structural mutations of a manifest: only typed errors;
- hostile safetensors headers and manifests (huge lengths, overlapping offsets, shape overflow, deep nesting,
  absurd tensor sizes) in a child process under ``RLIMIT_AS``: ``ManifestError``, bounded memory and time.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptstore.errors import CheckpointError, IntegrityError, ManifestError, StateMismatchError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.transfer import verify_step
from tests.faults.conftest import Backend, assert_state, make_state, zeros_like_state
from tests.faults.forge import sign

pytestmark = [pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
M2 = f"{step_dir(2)}/{MANIFEST_NAME}"


def _two_steps(b: Backend) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    mgr = b.manager()
    s1, s2 = make_state(1), make_state(2)
    mgr.save(1, s1, epoch=1, metrics={"loss": 1.0})
    mgr.save(2, s2, epoch=2, metrics={"loss": 0.5})
    return mgr, s1, s2


def _flip(b: Backend, rel: str, pos: int, mask: int = 0x01) -> bytes:
    data = b.read(rel)
    buf = bytearray(data)
    buf[pos] ^= mask
    b.write(rel, bytes(buf))
    return data


def test_bit_flip_in_shard_data(backend: Backend, caplog: Any) -> None:
    mgr, s1, s2 = _two_steps(backend)
    m = mgr.manifest(2)
    pieces = [(k, p) for k, e in m.tensors.items() for p in e.pieces if p.nbytes]  # (key, piece)
    rng = random.Random(1234)
    for _ in range(4):
        _, p = rng.choice(pieces)
        pos = rng.randrange(p.start, p.end)
        rel = f"{step_dir(2)}/{p.file}"
        good = _flip(backend, rel, pos, 1 << rng.randrange(8))
        fresh = backend.manager()
        with pytest.raises(IntegrityError) as ei:
            fresh.load(2)
        assert (ei.value.step, ei.value.file) == (2, p.file), str(ei.value)
        assert ei.value.key is not None and p.file in str(ei.value)
        target = zeros_like_state(s2)
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            assert fresh.restore(target).step == 1  # "latest" falls back to the previous verified step
        assert_state(target, s1)
        res = verify_step(fresh.storage, 2)
        assert not res.ok and any(pr.file == p.file for pr in res.problems), res.problems
        backend.write(rel, good)
    assert any("falling back" in r.message for r in caplog.records)
    assert_state(backend.manager().load(2), s2)


def test_bit_flip_in_shard_header(backend: Backend) -> None:
    mgr, _, s2 = _two_steps(backend)
    m = mgr.manifest(2)
    fname = sorted(m.files)[0]
    rel = f"{step_dir(2)}/{fname}"
    head = backend.read(rel)
    hlen = int.from_bytes(head[:8], "little")
    text = head[8 : 8 + hlen]
    targets = {
        "length field": 0,
        "dtype tag": 8 + text.index(b'"F32"') + 2,  # F32 -> G32
        "data offset digit": 8 + text.index(b"data_offsets") + len(b'data_offsets":[0,') + 1,
        "closing brace": 8 + text.rstrip().rindex(b"}"),
    }
    for what, pos in targets.items():
        good = _flip(backend, rel, pos, 0x01)
        fresh = backend.manager()
        target = zeros_like_state(s2)
        assert fresh.restore(target).step == 2, what  # the header is not used by restores ...
        assert_state(target, s2, what)
        res = verify_step(fresh.storage, 2)  # ... but verify checks it
        assert not res.ok and any("header" in pr.message for pr in res.problems), (what, res.problems)
        backend.write(rel, good)
    assert verify_step(backend.manager().storage, 2).ok


@pytest.mark.parametrize(
    "content",
    [b"", "truncated", b"\x00" * 64, b"[1, 2, 3]", "random"],
    ids=["empty", "truncated", "zeros", "json-array", "random-bytes"],
)
def test_empty_truncated_garbage_manifest(backend: Backend, content: Any) -> None:
    _, s1, _ = _two_steps(backend)
    good = backend.read(M2)
    if content == "truncated":
        content = good[: len(good) // 2]
    elif content == "random":
        content = random.Random(5).randbytes(len(good))
    backend.write(M2, content)
    fresh = backend.manager()
    for call in (lambda: fresh.load(2), lambda: fresh.info(2), lambda: fresh.restore(zeros_like_state(s1), step=2)):
        with pytest.raises(ManifestError):
            call()
    target = zeros_like_state(s1)
    assert fresh.restore(target).step == 1
    assert_state(target, s1)
    assert not verify_step(fresh.storage, 2).ok
    assert [i.step for i in fresh.history()] == [1]  # the damaged step is skipped with a warning


def _manifest_flip_outcomes(b: Backend, n: int, seed: int) -> dict[str, list[str]]:
    _, _, s2 = _two_steps(b)
    good = b.read(M2)
    info = (2, {"loss": 0.5})
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"typed": [], "identical": [], "silent": [], "untyped": []}
    for _ in range(n):
        pos, mask = rng.randrange(len(good)), 1 << rng.randrange(8)
        buf = bytearray(good)
        buf[pos] ^= mask
        b.write(M2, bytes(buf))
        ctx = good[max(0, pos - 20) : pos + 10].decode(errors="replace").replace("\n", " ")
        fresh = b.manager()
        try:
            got = fresh.load(2)
            i = fresh.info(2)
            target = zeros_like_state(s2)
            fresh.restore(target, step=2)
        except (CheckpointError, StateMismatchError):
            out["typed"].append(ctx)
            continue
        except Exception as e:
            out["untyped"].append(f"{ctx}: {type(e).__name__}: {e}")
            continue
        try:
            assert_state(got, s2)
            assert_state(target, s2)
            assert (i.epoch, i.metrics) == info
            out["identical"].append(ctx)
        except AssertionError:
            out["silent"].append(f"@{pos} ^{mask:#04x}: ...{ctx}...")
    b.write(M2, good)
    return out


def test_bit_flips_in_manifest_are_typed_or_harmless(backend: Backend) -> None:
    out = _manifest_flip_outcomes(backend, 60 if backend.name == "file" else 25, seed=7)
    print(f"\n[manifest bit flips, {backend.name}] " + ", ".join(f"{k}: {len(v)}" for k, v in out.items()))
    assert out["untyped"] == [], out["untyped"]
    assert len(out["typed"]) > len(out["silent"]) + len(out["identical"])


def test_no_manifest_bit_flip_loads_silently(tmp_path: Path) -> None:
    b = Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
    out = _manifest_flip_outcomes(b, 200, seed=11)
    assert out["silent"] == [], f"{len(out['silent'])}/200 flips changed the loaded state silently: {out['silent'][:5]}"


# -- structural fuzzing of the manifest ------------------------------------------------------------------
_JUNK: list[Any] = [None, True, 0, -1, 2**64, 1e308, -0.5, "", "x", "../x", "/etc/passwd", "s3://other/k", [], [1],
                    [[]], {}, {"t": "x"}, {"$float": "zz"}, {"$float": 3}, ["a", 1], {"a": [1, {"b": None}]},
                    "float32", "qint8", [2**62, 2**62], {"t": "device", "v": "zz"}, {"t": "size", "v": ["a"]},
                    {"t": "dict", "k": [[1]], "v": [1]}, {"t": "tensor", "key": "model/layer0.weight"},
                    {"t": "pickle", "key": "model/layer1.weight"}, {"t": "per_rank", "v": [1]}]  # fmt: skip


def _paths(o: Any, p: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [p]
    if isinstance(o, dict):
        for k, v in o.items():
            out += _paths(v, (*p, k))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            out += _paths(v, (*p, i))
    return out


@pytest.mark.timeout(180)
def test_manifest_structural_fuzz_only_typed_errors(tmp_path: Path) -> None:
    b = Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
    _, _, s2 = _two_steps(b)
    good = b.read(M2)
    untyped: list[str] = []
    counts: dict[str, int] = {}
    for seed in range(300):
        rng = random.Random(seed)
        doc = json.loads(good)
        for _ in range(rng.randint(1, 3)):
            p = rng.choice([q for q in _paths(doc) if q])
            parent = doc
            for k in p[:-1]:
                parent = parent[k]
            if rng.random() < 0.15:
                del parent[p[-1]]
            else:
                parent[p[-1]] = json.loads(json.dumps(rng.choice(_JUNK)))
        b.write(M2, sign(doc))  # re-signed: the structural checks must hold on their own
        fresh = b.manager()
        calls = {
            "load": lambda m: m.load(2),
            "restore": lambda m: m.restore(zeros_like_state(s2), step=2),
            "info": lambda m: m.info(2),
            "verify": lambda m: verify_step(m.storage, 2),
            "gc": lambda m: m.gc(min_age_seconds=1e9),
            "latest": lambda m: m.restore(zeros_like_state(s2)),
        }
        for name, call in calls.items():
            try:
                call(fresh)
                kind = "ok"
            except CheckpointError as e:
                kind = type(e).__name__
            except Exception as e:
                kind = "untyped"
                untyped.append(f"seed {seed} {name}: {type(e).__name__}: {e}")
            counts[f"{name}:{kind}"] = counts.get(f"{name}:{kind}", 0) + 1
    print("\n[manifest fuzz, 300 seeds] " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    assert untyped == [], untyped[:10]
    assert counts.get("load:ManifestError", 0) > 150


# -- hostile headers and manifests under a memory limit ----------------------------------------------------
@pytest.mark.timeout(180)
def test_hostile_headers_and_manifests_bounded_memory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_hostile_child.py")), str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows and rows[-1].get("done"), proc.stdout[-3000:]
    for r in rows[:-1]:
        print(f"\n  {r}", end="")
        assert r["outcome"] in r["allowed"], r
        assert r["seconds"] < 10, r
        assert r["rss_growth_mib"] < 200, r
