"""CheckpointManager on real local files and memory:// — round trips, restore semantics, integrity, safety."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager, IOOptions, PendingSave, PerRank, Pickled
from ckptstore.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    ManifestError,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from tests.faults.forge import sign


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path: Path) -> str:
    if request.param == "file":
        return str(tmp_path / "ckpt")
    return f"memory://ckpt-{uuid.uuid4().hex}"


def _local(mgr: CheckpointManager, rel: str) -> str:
    return mgr.storage.full(rel)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_round_trip_of_every_value_type(root: str) -> None:
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(3, dtype=torch.float64),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "i64": torch.tensor([2**40, -1]),
        "bool": torch.tensor([True, False]),
        "c64": torch.randn(3, dtype=torch.complex64),  # no safetensors dtype: stored as raw bytes
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "noncontig": torch.arange(12.0).reshape(3, 4).t(),
        "nested": {"list": [1, 2.5, "s", None, True, {"deep": torch.ones(2)}], "tuple": (1, (2, 3))},
        "int_keys": {0: "zero", 1: {"x": 1}},
        "specials": [float("inf"), float("-inf"), float("nan"), -0.0],
        "types": [torch.float16, torch.device("cpu"), torch.Size([2, 3])],
        "big_int": 2**70,
        "unicode": "héllo / wörld",
        "key/with%slash": torch.zeros(1),
    }
    with CheckpointManager(root) as mgr:
        mgr.save(1, state, epoch=0, metrics={"loss": 1.0})
        out = mgr.load(1)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert torch.equal(
                out[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else out[k],
                v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
            ), k
    assert out["nested"]["list"][:5] == [1, 2.5, "s", None, True]
    assert torch.equal(out["nested"]["list"][5]["deep"], torch.ones(2))
    assert out["nested"]["tuple"] == (1, (2, 3)) and isinstance(out["nested"]["tuple"][1], tuple)
    assert out["int_keys"] == {0: "zero", 1: {"x": 1}} and all(isinstance(k, int) for k in out["int_keys"])
    sp = out["specials"]
    assert sp[0] == math.inf and sp[1] == -math.inf and math.isnan(sp[2]) and math.copysign(1, sp[3]) == -1
    assert out["types"] == [torch.float16, torch.device("cpu"), torch.Size([2, 3])]
    assert isinstance(out["types"][2], torch.Size)
    assert out["big_int"] == 2**70 and out["unicode"] == "héllo / wörld"


def test_optimizer_round_trip_exact_with_integer_keys(root: str) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt)
    sched.step()
    with CheckpointManager(root) as mgr:
        mgr.save(10, {"model": model, "optim": opt, "sched": sched})
        m2 = _model()
        with torch.no_grad():
            for p in m2.parameters():
                p.zero_()
        o2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
        s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=3, gamma=0.1)
        info = mgr.restore({"model": m2, "optim": o2, "sched": s2})
    assert info.step == 10
    sd1, sd2 = opt.state_dict(), o2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert set(sd2["state"]) == set(sd1["state"]) and all(isinstance(k, int) for k in sd2["state"])
    for k, st in sd1["state"].items():
        for name, v in st.items():
            assert torch.equal(sd2["state"][k][name], v), (k, name)
    assert s2.state_dict() == sched.state_dict()
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_restore_reads_into_existing_storage(root: str) -> None:
    model = _model()
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"model": model})
        m2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
        ptrs = {k: v.data_ptr() for k, v in m2.state_dict().items()}
        mgr.restore({"model": m2})
    for k, v in m2.state_dict().items():
        assert v.data_ptr() == ptrs[k], k
        assert torch.equal(v, model.state_dict()[k]), k


def test_restore_updates_plain_containers_in_place(root: str) -> None:
    with CheckpointManager(root) as mgr:
        mgr.save(
            3, {"extra": {"seen": 123, "hist": [1, 2]}, "w": torch.arange(4.0), "rng": PerRank(torch.get_rng_state())}
        )
        extra = {"seen": 0, "hist": [0, 0]}
        w = torch.zeros(4)
        rng = PerRank(None)
        mgr.restore({"extra": extra, "w": w, "rng": rng})
    assert extra == {"seen": 123, "hist": [1, 2]}
    assert torch.equal(w, torch.arange(4.0))
    assert isinstance(rng.value, torch.Tensor) and rng.value.dtype == torch.uint8


def test_map_location_variants(root: str) -> None:
    t = {"a": torch.randn(3), "b": {"c": torch.ones(2, dtype=torch.int32)}}
    with CheckpointManager(root) as mgr:
        mgr.save(1, t)
        for ml in ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage, lambda storage, loc: None]:
            out = mgr.load(1, map_location=ml)
            assert out["a"].device.type == "cpu" and torch.equal(out["a"], t["a"])
        seen = []

        def per_key(key: str, tensor: torch.Tensor) -> str:
            seen.append((key, tuple(tensor.shape)))
            return "meta" if key == "a" else "cpu"

        out = mgr.load(1, map_location=per_key)
        assert out["a"].device.type == "meta" and out["b"]["c"].device.type == "cpu"
        assert ("a", (3,)) in seen and ("b/c", (2,)) in seen
        meta = mgr.load(1, map_location="meta")
        assert meta["a"].is_meta and meta["a"].shape == (3,)
        # An unavailable device asked for is refused, as torch.load refuses it (issue #17: it loaded to CPU).
        if not torch.cuda.is_available():
            with pytest.raises(UnsupportedValueError, match="not available"):
                mgr.load(1, map_location="cuda:0")
        with pytest.raises(UnsupportedValueError):
            mgr.load(1, map_location=42)


def test_strict_mode_lists_missing_and_unexpected(root: str) -> None:
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"model": torch.nn.Linear(4, 2)})
        bigger = torch.nn.Sequential(torch.nn.Linear(4, 2))
        with pytest.raises(StateMismatchError) as ei:
            mgr.restore({"model": bigger})
        msg = str(ei.value)
        assert "0.weight" in msg and "missing" in msg and "unexpected" in msg and "model/weight" in ei.value.unexpected
        with pytest.raises(StateMismatchError, match="not_there"):
            mgr.restore({"not_there": torch.zeros(1)})
        wrong = torch.nn.Linear(5, 2)
        with pytest.raises(StateMismatchError, match="shape"):
            mgr.restore({"model": wrong})
        # Non-strict restores what matches; nothing was modified by the failed attempts above.
        mgr.restore({"model": torch.nn.Linear(4, 2)}, strict=False)


def test_flipped_byte_raises_integrity_error_and_latest_falls_back(tmp_path: Path, caplog) -> None:
    root = str(tmp_path / "c")
    mgr = CheckpointManager(root)
    a = {"w": torch.arange(1000.0), "v": torch.ones(10)}
    b = {"w": torch.arange(1000.0) * 2, "v": torch.ones(10) * 2}
    mgr.save(1, a)
    mgr.save(2, b)
    m = mgr.manifest(2)
    piece = m.tensors["w"].pieces[0]
    path = _local(mgr, f"step-000000000002/{piece.file}")
    with open(path, "r+b") as f:
        f.seek(piece.start + 100)
        byte = f.read(1)
        f.seek(piece.start + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(IntegrityError) as ei:
        mgr.load(2)
    assert ei.value.step == 2 and ei.value.key == "w" and ei.value.file == piece.file
    assert "w" in str(ei.value) and piece.file in str(ei.value)
    target = {"w": torch.zeros(1000), "v": torch.zeros(10)}
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        info = mgr.restore(target)
    assert info.step == 1 and torch.equal(target["w"], a["w"]) and torch.equal(target["v"], a["v"])
    assert any("falling back" in r.message for r in caplog.records)
    with pytest.raises(IntegrityError):
        mgr.restore(target, step=2)
    out = mgr.load(2, verify=False)  # explicitly skipping verification reads the damaged bytes
    assert not torch.equal(out["w"], b["w"])


def test_load_maps_local_files_copy_on_write(tmp_path: Path) -> None:
    # load() on local disk maps the shard files MAP_PRIVATE: same values, writes stay private, the files never
    # change, and the tensors outlive the deletion of the step. Odd offsets (a 3-byte tensor before a float64
    # one) fall back to reading.
    state = {"w": torch.randn(64, 33), "odd": torch.arange(3, dtype=torch.uint8), "d": torch.randn(7).double()}
    state["bf"] = torch.randn(5).to(torch.bfloat16)
    root = str(tmp_path / "c")
    with CheckpointManager(root) as mgr:
        mgr.save(1, state)
        reads: list[int] = []
        orig = mgr.storage.read_into
        mgr.storage.read_into = lambda rel, off, bufs: reads.append(sum(b.nbytes for b in bufs)) or orig(rel, off, bufs)
        mapped = mgr.load(1)
        assert sum(reads) < state["w"].nbytes  # "w" was mapped, not read
        for k, v in state.items():
            assert mapped[k].dtype == v.dtype and torch.equal(mapped[k], v)
        mapped["w"].add_(1)  # private to this process
        assert torch.equal(mgr.load(1)["w"], state["w"])
        mgr.delete(1)
        assert torch.equal(mapped["w"], state["w"] + 1) and torch.equal(mapped["d"], state["d"])
    with CheckpointManager(str(tmp_path / "r"), io=IOOptions(mmap_load=False)) as mgr:
        mgr.save(1, state)
        read = mgr.load(1)
        assert all(torch.equal(read[k], v) for k, v in state.items())


def test_truncated_shard_is_never_loaded_silently(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"w": torch.randn(4096)})
    p = mgr.manifest(1).tensors["w"].pieces[0]
    path = _local(mgr, f"step-000000000001/{p.file}")
    os.truncate(path, p.start + 10)
    with pytest.raises(IntegrityError, match="shorter"):
        mgr.load(1, verify=False)


@pytest.mark.parametrize("content", [b"", b'{"format": "ckptstore"', b"\x00" * 64, b"[1,2,3]"])
def test_truncated_or_garbage_manifest(tmp_path: Path, content: bytes) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"w": torch.ones(3)})
    mgr.save(2, {"w": torch.ones(3) * 2})
    Path(_local(mgr, "step-000000000002/manifest.json")).write_bytes(content)
    fresh = CheckpointManager(str(tmp_path / "c"))
    with pytest.raises(ManifestError):
        fresh.info(2)
    with pytest.raises(ManifestError):
        fresh.load(2)
    target = {"w": torch.zeros(3)}
    assert fresh.restore(target).step == 1 and torch.equal(target["w"], torch.ones(3))


def test_path_escape_in_manifest_refused_before_reading(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"w": torch.ones(3)})
    mp = Path(_local(mgr, "step-000000000001/manifest.json"))
    doc = json.loads(mp.read_bytes())
    (name,) = doc["files"]
    for evil in ["../../secret.safetensors", "/etc/passwd"]:
        d = json.loads(json.dumps(doc))
        d["files"] = {evil: d["files"][name]}
        d["tensors"]["w"]["pieces"][0]["file"] = evil
        mp.write_bytes(sign(d))  # a valid self-checksum: hostile, not damaged
        with pytest.raises(UnsafeCheckpointError):
            CheckpointManager(str(tmp_path / "c")).load(1)


class _Evil:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_is_refused_then_never_executed_without_trust(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    sentinel = tmp_path / "PWNED"
    with pytest.raises(UnsupportedValueError, match="allow_pickle"):
        mgr.save(1, {"obj": _Evil(str(sentinel))})
    assert mgr.steps() == []
    mgr.save(1, {"obj": _Evil(str(sentinel)), "w": torch.ones(2)}, allow_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
        mgr.load(1)
    with pytest.raises(UnsafeCheckpointError):
        mgr.restore({"w": torch.zeros(2)}, step=1)
    assert not sentinel.exists()
    with pytest.raises(UnsupportedValueError, match="Pickled"):
        mgr.save(3, {"m": Pickled(torch.nn.Linear(1, 1))})
    # An entire-model pickle (the tutorial's torch.save(model)) round-trips when trusted.
    model = torch.nn.Linear(3, 2)
    mgr.save(2, {"model_obj": Pickled(model)}, allow_pickle=True)
    back = mgr.load(2, trusted=True)["model_obj"]
    assert isinstance(back, torch.nn.Linear) and torch.equal(back.weight, model.weight)


def test_existing_step_is_immutable(root: str) -> None:
    with CheckpointManager(root) as mgr:
        mgr.save(5, {"w": torch.ones(2)})
        with pytest.raises(CheckpointExistsError) as ei:
            mgr.save(5, {"w": torch.zeros(2)})
        assert isinstance(ei.value, FileExistsError) and ei.value.step == 5
        assert torch.equal(mgr.load(5)["w"], torch.ones(2))


def test_listing_sorts_as_integers_and_queries(root: str) -> None:
    with CheckpointManager(root) as mgr:
        losses = {1: 0.9, 2: 0.5, 10: 0.7, 100: 0.3, 9: float("nan"), 11: None}
        for s, loss in losses.items():
            mgr.save(
                s, {"w": torch.full((2,), float(s))}, epoch=s // 10, metrics={} if loss is None else {"loss": loss}
            )
        assert mgr.steps() == [1, 2, 9, 10, 11, 100]
        assert mgr.latest().step == 100
        assert mgr.best("loss", "min").step == 100
        assert mgr.best("loss", "max").step == 1
        assert mgr.info(10).epoch == 1 and mgr.info(10).metrics == {"loss": 0.7}
        assert [i.step for i in mgr.history()] == [1, 2, 9, 10, 11, 100]
        assert torch.equal(mgr.load("best")["w"], torch.full((2,), 100.0))
        with pytest.raises(CheckpointNotFoundError) as ei:
            mgr.info(3)
        assert isinstance(ei.value, FileNotFoundError) and "committed steps" in str(ei.value)
        mgr.delete(100)
        assert mgr.steps() == [1, 2, 9, 10, 11] and mgr.latest().step == 11
        with pytest.raises(CheckpointNotFoundError):
            mgr.delete(100)


def test_partial_steps_are_invisible_and_garbage_collected(tmp_path: Path) -> None:
    root = tmp_path / "c"
    mgr = CheckpointManager(str(root))
    mgr.save(1, {"w": torch.ones(2)})
    partial = root / "step-000000000002"
    partial.mkdir()
    (partial / "shard-deadbeef-r0-0.safetensors").write_bytes(b"x" * 100)
    orphan = root / "step-000000000001" / "shard-0badf00d-r0-0.safetensors"
    orphan.write_bytes(b"y")
    assert mgr.steps() == [1] and mgr.latest().step == 1
    assert mgr.restore({"w": torch.zeros(2)}).step == 1
    assert mgr.gc(min_age_seconds=3600) == []  # too young: could be a save in progress
    removed = mgr.gc(min_age_seconds=0)
    assert sorted(removed) == [
        "step-000000000001/shard-0badf00d-r0-0.safetensors",
        "step-000000000002/shard-deadbeef-r0-0.safetensors",
    ]
    assert not partial.exists() and not orphan.exists()
    assert torch.equal(mgr.load(1)["w"], torch.ones(2))


def test_unsupported_values_and_bad_arguments(root: str) -> None:
    with CheckpointManager(root) as mgr:
        with pytest.raises(UnsupportedValueError, match="'a/b'"):
            mgr.save(1, {"a": {"b": object()}})
        with pytest.raises(UnsupportedValueError):
            mgr.save(-1, {})
        with pytest.raises(UnsupportedValueError):
            mgr.save(1, {}, metrics={"loss": object()})
        with pytest.raises(UnsupportedValueError, match="key"):
            mgr.save(1, {"d": {(1, 2): 3}})
        assert mgr.steps() == []
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore({"w": torch.zeros(1)})
    with pytest.raises(CheckpointError):
        mgr.save(1, {})  # closed


def test_large_tensors_are_chunked_and_spread_over_files(tmp_path: Path) -> None:
    io = IOOptions(chunk_bytes=1 << 20, min_split_bytes=1 << 20, file_bytes=2 << 20, threads=3)
    mgr = CheckpointManager(str(tmp_path / "c"), io=io)
    big = torch.randn(1024, 1024)  # 4 MiB -> 4 chunks
    small = {f"s{i}": torch.randn(16) for i in range(50)}
    res = mgr.save(1, {"big": big, **small})
    m = mgr.manifest(1)
    assert len(m.tensors["big"].pieces) == 4 and res.files >= 2
    assert len({p.file for p in m.tensors["big"].pieces}) >= 2
    out = mgr.load(1)
    assert torch.equal(out["big"], big) and all(torch.equal(out[k], v) for k, v in small.items())
    target = torch.zeros(1024, 1024)
    mgr.restore({"big": target}, strict=False)
    assert torch.equal(target, big)


def test_async_save_captures_state_at_call_time(root: str) -> None:
    with CheckpointManager(root) as mgr:
        w = torch.ones(1000)
        pending = mgr.save(1, {"w": w}, blocking=False)
        assert isinstance(pending, PendingSave)
        w.mul_(5)  # training continues and mutates the tensor right away
        res = pending.wait()
        assert res.step == 1 and pending.done() and pending.exception() is None
        assert torch.equal(mgr.load(1)["w"], torch.ones(1000))
        mgr.save(2, {"w": w}, blocking=False)
    # close() waited for the pending save
    assert CheckpointManager(root).steps() == [1, 2]


def test_async_save_error_reraises_with_original_type(root: str) -> None:
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        pending = mgr.save(1, {"w": torch.ones(1)}, blocking=False)
        with pytest.raises(CheckpointExistsError):
            pending.wait()
        assert isinstance(pending.exception(), CheckpointExistsError)


def test_async_staging_buffers_are_reused_and_budget_respected(tmp_path: Path, caplog) -> None:
    w = torch.randn(1 << 16)
    with CheckpointManager(str(tmp_path / "c")) as mgr:
        mgr.save(1, {"w": w}, blocking=False).wait()
        ptr = mgr.preparer.staging._bufs["w"].data_ptr()
        w.add_(1)
        mgr.save(2, {"w": w}, blocking=False).wait()
        assert mgr.preparer.staging._bufs["w"].data_ptr() == ptr  # warm buffer reused, no fresh allocation
        assert torch.equal(mgr.load(2)["w"], w) and not torch.equal(mgr.load(1)["w"], w)
    small = IOOptions(staging_budget_bytes=1024)
    with CheckpointManager(str(tmp_path / "d"), io=small) as mgr, caplog.at_level(logging.WARNING, "ckptstore"):
        res = mgr.save(1, {"w": w}, blocking=False)
        assert not isinstance(res, PendingSave) and res.step == 1  # over budget: saved synchronously
        assert any("staging budget" in r.message for r in caplog.records)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
@pytest.mark.parametrize("nice", [10, 0])
def test_async_writer_threads_yield_to_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nice: int) -> None:
    # Every thread that writes shard files of an async save runs at io.background_nice; sync saves do not.
    import ckptstore.io as cio

    seen: list[tuple[str, int]] = []
    orig = cio.write_file

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return orig(*args, **kwargs)

    monkeypatch.setattr(cio, "write_file", spy)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    state = {f"t{i}": torch.randn(1 << 18) for i in range(8)}  # 8 MiB in 8 tensors
    io = IOOptions(background_nice=nice, min_split_bytes=1 << 20)  # several files, so several writer threads
    with CheckpointManager(str(tmp_path / "c"), io=io) as mgr:
        mgr.save(1, state)
        sync = list(seen)
        seen.clear()
        mgr.save(2, state, blocking=False).wait()
    assert len(sync) > 1 and len(seen) > 1
    assert {p for _, p in sync} == {base}
    assert {p for _, p in seen} == {max(base, nice)}


def test_retention_runs_after_async_saves_commit(root: str) -> None:
    with CheckpointManager(root, retention={"keep_last": 2, "keep_best": {"k": 1, "metric": "loss"}}) as mgr:
        losses = [0.5, 0.1, 0.9, 0.8, 0.7, 0.95]
        for s, loss in enumerate(losses, start=1):
            mgr.save(s, {"w": torch.full((10,), float(s))}, metrics={"loss": loss}, blocking=False)
        res = mgr.wait()
        assert res is not None and res.step == 6
    # best (step 2, loss 0.1) + the last two; deletions happened in the background after each commit
    assert CheckpointManager(root).steps() == [2, 5, 6]
