"""ckptstore.transfer: copy/verify/sync of committed steps between roots (local disk and memory://)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError, IntegrityError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.storage import open_storage
from ckptstore.transfer import (
    TransferCancelled,
    committed_steps,
    copy_step,
    copy_steps,
    mirror,
    sync_once,
    verify_step,
)
from tests.faults.forge import sign


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
        "big": torch.randn(300_000, generator=g),  # several chunks with chunk_bytes=256 KiB
        "step": seed,
    }


@pytest.fixture(params=["file", "memory"])
def roots(request, tmp_path: Path) -> tuple[str, str]:
    if request.param == "file":
        return str(tmp_path / "src"), str(tmp_path / "dst")
    u = uuid.uuid4().hex
    return f"memory://src-{u}", f"memory://dst-{u}"


def _mgr(root: str) -> CheckpointManager:
    return CheckpointManager(root)


def _flip(storage, step: int, key: str, at: int = 3) -> str:
    mgr = CheckpointManager(storage.url)
    piece = mgr.manifest(step).tensors[key].pieces[0]
    rel = f"{step_dir(step)}/{piece.file}"
    data = bytearray(storage.read_bytes(rel))
    data[piece.start + at] ^= 0x40
    storage.remove(rel)
    storage.write_bytes(rel, bytes(data))
    return piece.file


def test_copy_steps_copies_bytes_exactly_and_skips_existing(roots: tuple[str, str]) -> None:
    src_url, dst_url = roots
    src = _mgr(src_url)
    for s in (1, 2, 10):
        src.save(s, _state(s), epoch=s, metrics={"loss": 1 / s})
    dst_st = open_storage(dst_url)
    done = []
    res = copy_steps(src, dst_st, [2], on_step=done.append, chunk_bytes=256 << 10)
    assert [r.step for r in res] == [2] and res[0].copied and res[0].files == 2
    assert committed_steps(dst_st) == [2]
    assert sorted(set(committed_steps(src.storage)) - set(committed_steps(dst_st))) == [1, 10]
    res = copy_steps(src, dst_st, chunk_bytes=256 << 10, threads=2)
    assert [(r.step, r.copied) for r in res] == [(1, True), (2, False), (10, True)]
    dst = _mgr(dst_url)
    assert dst.steps() == [1, 2, 10]
    for s in (1, 2, 10):
        prefix = step_dir(s)
        for name in src.storage.list_dir(prefix):
            assert dst.storage.read_bytes(f"{prefix}/{name}") == src.storage.read_bytes(f"{prefix}/{name}")
        back = dst.load(s)
        assert torch.equal(back["big"], _state(s)["big"]) and back["step"] == s
        assert dst.info(s).metrics == {"loss": 1 / s}
    with pytest.raises(CheckpointExistsError):
        copy_step(src, dst, 1)
    with pytest.raises(CheckpointNotFoundError):
        copy_steps(src, dst, [3])


def test_corrupt_source_is_never_committed(roots: tuple[str, str]) -> None:
    src_url, dst_url = roots
    src = _mgr(src_url)
    src.save(1, _state(1))
    src.save(2, _state(2))
    fname = _flip(src.storage, 2, "big", at=700_000)
    dst = open_storage(dst_url)
    with pytest.raises(IntegrityError) as ei:
        copy_step(src, dst, 2, chunk_bytes=256 << 10)
    assert ei.value.step == 2 and ei.value.key == "big" and ei.value.file == fname
    assert committed_steps(dst) == []
    assert dst.list_dir(step_dir(2)) == []  # the data written so far was removed
    errors = []
    res = copy_steps(src, dst, on_error=lambda s, e: errors.append((s, type(e).__name__)))
    assert [r.step for r in res] == [1] and errors == [(2, "IntegrityError")]
    # Without verification the bytes are copied as they are (and then verify finds the damage).
    copy_step(src, dst, 2, verify=False)
    rep = verify_step(dst, 2)
    assert not rep.ok and [(p.key, p.file) for p in rep.problems] == [("big", fname)]


def test_verify_reports_every_problem_with_step_file_and_key(tmp_path: Path) -> None:
    mgr = _mgr(str(tmp_path / "r"))
    mgr.save(5, _state(5))
    ok = verify_step(mgr, 5)
    assert ok.ok and ok.tensors == 3 and ok.nbytes == sum(mgr.manifest(5).files.values())
    fname = _flip(mgr.storage, 5, "model/w")
    rep = verify_step(mgr, 5, chunk_bytes=1 << 20)
    assert not rep.ok
    (p,) = rep.problems
    assert (p.step, p.file, p.key) == (5, fname, "model/w") and "checksum mismatch" in p.message
    assert "model/w" in str(p) and rep.to_dict()["problems"][0]["key"] == "model/w"
    # Truncation names the keys whose bytes are gone and the size mismatch.
    path = mgr.storage.full(f"{step_dir(5)}/{fname}")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    rep = verify_step(mgr, 5)
    msgs = [str(p) for p in rep.problems]
    assert any("manifest says" in m for m in msgs) and any("'big'" in m and "truncated" in m for m in msgs)
    os.remove(path)
    rep = verify_step(mgr, 5)
    assert [p.message for p in rep.problems] == ["the data file is missing (3 tensors)"]
    with pytest.raises(CheckpointNotFoundError):
        verify_step(mgr, 6)


def test_verify_checks_the_safetensors_header(tmp_path: Path) -> None:
    mgr = _mgr(str(tmp_path / "r"))
    mgr.save(1, {"w": torch.ones(8)})
    piece = mgr.manifest(1).tensors["w"].pieces[0]
    path = mgr.storage.full(f"{step_dir(1)}/{piece.file}")
    data = bytearray(open(path, "rb").read())
    data[9] = ord("[")  # the JSON header no longer parses; the tensor bytes are intact
    open(path, "wb").write(bytes(data))
    (p,) = verify_step(mgr, 1).problems
    assert p.file == piece.file and "header" in p.message


def test_manifest_damage_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    mgr = _mgr(str(tmp_path / "r"))
    mgr.save(1, {"w": torch.ones(8)})
    with open(mgr.storage.full(f"{step_dir(1)}/{MANIFEST_NAME}"), "wb") as f:
        # Signed (a valid self-checksum), so the path check, not the integrity check, is what refuses it.
        f.write(sign({"format": "ckptstore", "format_version": 1, "step": 1, "files": {"../x": 3}}, lines=False))
    (p,) = verify_step(open_storage(str(tmp_path / "r")), 1).problems
    assert p.file == MANIFEST_NAME and "../x" in p.message


def test_cancelled_copy_commits_nothing(tmp_path: Path) -> None:
    src = _mgr(str(tmp_path / "src"))
    src.save(1, _state(1))
    dst = open_storage(str(tmp_path / "dst"))
    calls = {"n": 0}

    def stop_after_two_chunks() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(TransferCancelled):
        copy_step(src, dst, 1, chunk_bytes=256 << 10, should_stop=stop_after_two_chunks)
    assert committed_steps(dst) == [] and dst.list_dir(step_dir(1)) == []


def test_destination_committed_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    src = _mgr(str(tmp_path / "src"))
    src.save(1, _state(1))
    dst = _mgr(str(tmp_path / "dst"))
    orig = dst.storage.create_exclusive

    raced = []

    def racing_create(rel: str, data: bytes) -> None:
        if rel.endswith(MANIFEST_NAME) and not raced:
            raced.append(rel)
            dst.save(1, {"other": torch.zeros(1)})  # another writer commits the same step first
        orig(rel, data)

    dst.storage.create_exclusive = racing_create  # type: ignore[method-assign]
    with pytest.raises(CheckpointExistsError):
        copy_step(src, dst.storage, 1)
    assert list(CheckpointManager(str(tmp_path / "dst")).load(1)) == ["other"]


def test_sync_once_and_mirror_follow_new_steps(tmp_path: Path) -> None:
    src = _mgr(str(tmp_path / "src"))
    dst_st = open_storage(str(tmp_path / "dst"))
    src.save(1, _state(1))
    assert [r.step for r in sync_once(src, dst_st)] == [1]
    assert sync_once(src, dst_st) == []
    stop = threading.Event()
    seen: list[int] = []
    t = threading.Thread(
        target=mirror,
        args=(src, dst_st),
        kwargs={"stop": stop, "interval": 0.05, "on_step": lambda r: seen.append(r.step)},
    )
    t.start()
    try:
        src.save(2, _state(2))
        deadline = time.monotonic() + 20
        while 2 not in committed_steps(dst_st) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(20)
    assert not t.is_alive()
    assert committed_steps(dst_st) == [1, 2] and seen == [2]
    assert torch.equal(CheckpointManager(str(tmp_path / "dst")).load(2)["big"], _state(2)["big"])


def test_a_destination_with_an_older_generation_gets_the_new_one(tmp_path: Path) -> None:
    """Before: ``cp``/``sync`` compared step numbers only, so a mirror holding generation 1 of step 200 (the
    timeline the source abandoned after a fallback) kept serving it, and restores from the mirror went back to it."""
    from ckptstore.transfer import copy_steps, sync_once

    src = CheckpointManager(str(tmp_path / "src"))
    src.save(100, {"w": torch.full((64,), 1.0)})
    src.save(200, {"w": torch.full((64,), 2.0)})
    mirrors = [CheckpointManager(str(tmp_path / name)) for name in ("cp", "sync")]
    for m in mirrors:
        copy_steps(src, m)
    shard = next((tmp_path / "src").glob("step-*200/*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    assert src.restore({"w": torch.zeros(64)}).step == 100  # falls back, quarantines generation 1 of 200
    src.save(200, {"w": torch.full((64,), 2.5)})
    res_cp = copy_steps(src, mirrors[0])
    res_sync = sync_once(src, mirrors[1])
    assert [(r.step, r.copied) for r in res_cp] == [(100, False), (200, True)]
    assert [(r.step, r.copied) for r in res_sync] == [(200, True)]
    for m in mirrors:
        fresh = CheckpointManager(m.url)
        assert fresh.info(200).generation == 2
        assert torch.equal(fresh.load(200)["w"], torch.full((64,), 2.5))
    assert [(r.step, r.copied) for r in copy_steps(src, mirrors[0])] == [(100, False), (200, False)]  # now in sync
