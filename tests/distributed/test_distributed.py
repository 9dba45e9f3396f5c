"""Distributed save/restore over real processes (gloo on CPU): DDP, FSDP2, commit protocol, faults, resharding.

Every test launches real ranks through ``tests.fixtures.dist.run_ranks``; the per-rank bodies live in
``tests/distributed/_workers.py``. Launches are few and reused (several checks per launch) because 4 ranks on
2 cores are slow to start. Measured figures (bytes per rank, timings) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager, PerRank
from ckptstore.format.manifest import Manifest, step_dir
from tests.distributed import _workers as W
from tests.fixtures.dist import assert_bit_equal, run_ranks, values

pytestmark = pytest.mark.distributed

_RANK_RE = re.compile(r"-r(\d+)-\d+\.safetensors$")


# -- manifest accounting -----------------------------------------------------------------------------------------
def bytes_by_rank(m: Manifest) -> list[int]:
    """Tensor bytes each rank wrote (from the shard file names in the manifest)."""
    out = [0] * m.world_size
    for e in m.tensors.values():
        for p in e.pieces:
            match = _RANK_RE.search(p.file)
            assert match, p.file
            out[int(match.group(1))] += p.nbytes
    return out


def header_bytes(root: str, m: Manifest) -> int:
    total = 0
    for name in m.files:
        with open(Path(root) / step_dir(m.step) / name, "rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return total


def assert_exact_cover(m: Manifest) -> None:
    """Every element of every tensor is stored exactly once (no duplicated bytes, no gaps)."""
    for key, e in m.tensors.items():
        if e.encoding != "raw":
            continue
        cover = torch.zeros(e.shape, dtype=torch.int32)
        for p in e.pieces:
            offs = p.offsets if p.offsets is not None else (0,) * len(e.shape)
            shape = p.shape if p.shape is not None else e.shape
            cover[tuple(slice(o, o + s) for o, s in zip(offs, shape))] += 1
        assert bool((cover == 1).all()), f"{key}: elements stored {cover.min()}..{cover.max()} times"


def state_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    return 0


def check_balance(m: Manifest, root: str, expected_bytes: int, label: str) -> list[int]:
    per_rank = bytes_by_rank(m)
    total = sum(per_rank)
    files_total = sum(m.files.values())
    mean = total / m.world_size
    spread = max(abs(b - mean) / mean for b in per_rank)
    print(
        f"\n[{label}] world={m.world_size} state={expected_bytes} B written={total} B "
        f"(+{header_bytes(root, m)} B headers = {files_total} B in {len(m.files)} files) per rank={per_rank} "
        f"max deviation from mean={spread:.2%}"
    )
    assert total == expected_bytes, "bytes written != bytes of the state (duplicated or missing data)"
    assert files_total - header_bytes(root, m) == total
    assert_exact_cover(m)
    assert spread <= 0.10, f"per-rank bytes {per_rank} deviate {spread:.1%} from the mean"
    return per_rank


# -- DDP --------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_ddp_two_ranks(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    # A single process saves step 1; the 2-rank job restores it (world size 1 -> 2).
    model = W.make_mlp(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    W.train(model, opt, 1, 0, W.WIDTH)
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"model": model, "optim": opt})
    ref1 = W.snapshot(model, opt)

    outs = values(run_ranks(W.ddp_two_ranks, 2, root, timeout=200))
    mgr = CheckpointManager(root)

    # 1 -> 2, with "latest" decided by rank 0 (rank 1 was made to see no step at all).
    for r, o in enumerate(outs):
        assert o["restored_1"]["step"] == 1 and o["restored_1"]["world_size"] == 1, r
        assert_bit_equal(o["restored_1"]["state"], ref1, f"rank{r}")

    # Restore errors: the same type on every rank, named after the rank that hit it.
    for r, o in enumerate(outs):
        kind, msg = o["restore_errors"]["best"]
        assert kind == "CheckpointNotFoundError", (r, kind, msg)
        kind, msg = o["restore_errors"]["mismatch"]
        assert kind == "StateMismatchError" and ("rank 1" in msg or r == 1), (r, kind, msg)

    # A tensor above chunk_bytes is split into row ranges written by both ranks, each byte once.
    m2 = mgr.manifest(2)
    pieces = m2.tensors["big"].pieces
    assert len(pieces) >= 2 and {_RANK_RE.search(p.file).group(1) for p in pieces} == {"0", "1"}
    assert_exact_cover(m2)
    assert_bit_equal(mgr.load(2)["big"], torch.arange(1000 * W.WIDTH, dtype=torch.float32).reshape(1000, W.WIDTH))

    # Model + optimizer + per-rank state: written once in total, balanced by bytes.
    s0, s1 = outs[0]["state_3"], outs[1]["state_3"]
    assert_bit_equal(s0, s1, "DDP replicas")  # what makes writing them once correct
    m3 = mgr.manifest(3)
    assert m3.world_size == 2 and m3.epoch == 1
    expected = state_bytes(s0["model"]) + state_bytes(s0["optim"]["state"])
    expected += sum(o["rng_3"].numel() for o in outs)
    check_balance(m3, root, expected, "DDP 2 ranks, 16 equal layers + Adam + per-rank RNG")

    # Injected OSError on rank 1: no manifest, every rank raises DistributedSaveError naming rank 1.
    for r, o in enumerate(outs):
        f = o["fault"]
        assert f is not None, f"rank {r} did not raise"
        assert f["type"] == "DistributedSaveError" and set(f["failed_ranks"]) == {1}, f
        assert "injected" in f["failed_ranks"][1] and "rank 1" in f["message"], f
    assert 4 not in mgr.steps()
    assert not (Path(root) / step_dir(4)).exists(), "the failed attempt's files were not cleaned up"

    # The previous step restores on the same processes, per-rank state included; the next save commits.
    for r, o in enumerate(outs):
        assert o["restored_3"]["step"] == 3
        assert_bit_equal(o["restored_3"]["state"], o["state_3"], f"rank{r}")
        assert_bit_equal(o["restored_3"]["rng"], o["rng_3"], f"rank{r} rng")
        assert o["restored_3"]["sampler"] == {"rank": r, "pos": 100 + r}
        assert o["save_5"] == 5
    assert mgr.steps() == [1, 2, 3, 5]

    # 2 -> 1: a single process restores the 2-rank step into a fresh model and optimizer ...
    model1 = W.make_mlp(seed=77)
    opt1 = torch.optim.Adam(model1.parameters(), lr=1e-2)
    rng_box = PerRank(None)
    info = mgr.restore({"model": model1, "optim": opt1, "rng": rng_box}, step=3)
    assert info.world_size == 2
    assert_bit_equal(W.snapshot(model1, opt1), s0)
    assert_bit_equal(rng_box.value, outs[0]["rng_3"])  # a lone process is rank 0
    # ... and load() consolidates it into plain tensors.
    sd = mgr.load(3)
    assert_bit_equal(sd["model"], s0["model"])
    assert_bit_equal(sd["optim"]["state"], s0["optim"]["state"])
    assert sd["sampler"] == {"rank": 0, "pos": 100}


@pytest.mark.timeout(180)
def test_ddp_overlap_staging(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    outs = values(run_ranks(W.ddp_overlap, 2, root, timeout=150))
    for r, o in enumerate(outs):
        assert o["step"] == 1
        assert_bit_equal(o["saved"], outs[0]["saved"], f"DDP replica {r}")
        # Training went on right after save() returned, yet the step holds the state at call time.
        assert not torch.equal(o["after"]["model"]["0.weight"], o["saved"]["model"]["0.weight"])
        # Rank 1 changed a weight before its copy was made: every rank fails, naming rank 1; nothing committed.
        assert o["fault"] is not None and o["fault"]["type"] in ("StateChangedError", "DistributedSaveError"), o
        assert "changed in place" in o["fault"]["msg"], o["fault"]
        assert o["steps"] == [1]
        # The DDP forward (buffer broadcast, then the buffer's update) waited: this rank's copy holds its own values.
        assert torch.equal(o["bn_staged"], o["bn_want"]) and not torch.equal(o["bn_now"], o["bn_want"]), r
        # The ranks' buffers differ, so they are not replicas: step 3 is refused instead of keeping rank 0's only.
        assert o["bn_save"].startswith("DistributedSaveError") and "'bn/1.acc'" in o["bn_save"], o["bn_save"]
    assert not torch.equal(outs[0]["bn_want"], outs[1]["bn_want"])  # else the test would prove nothing
    assert outs[0]["fault"]["type"] == "DistributedSaveError" and outs[0]["fault"]["failed"] == [1]
    with CheckpointManager(root) as mgr:
        assert mgr.steps() == [1]
        sd = mgr.load(1)
    assert_bit_equal(sd["model"], outs[0]["saved"]["model"])
    assert_bit_equal(sd["optim"]["state"], outs[0]["saved"]["optim"]["state"])


@pytest.mark.timeout(120)
def test_preemption_agreement_during_an_async_save(tmp_path: Path) -> None:
    outs = values(run_ranks(W.schedule_during_async_save, 2, str(tmp_path / "ckpt"), timeout=90))
    for o in outs:
        assert o["decisions"] == [True, False] and o["step"] == 1 and o["steps"] == [1]
        assert o["agree_seconds"] < 15  # agreed at once, not after a collective timed out


@pytest.mark.timeout(240)
def test_ddp_four_ranks_balance(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    outs = values(run_ranks(W.ddp_balance, 4, root, 24, timeout=200))
    saved = outs[0]["saved"]
    for r, o in enumerate(outs):
        assert_bit_equal(o["saved"], saved, f"DDP replica {r}")
        assert_bit_equal(o["restored"], o["saved"], f"rank{r} restored")
        assert_bit_equal(o["restored_async"], o["saved_async"], f"rank{r} restored async")
    mgr = CheckpointManager(root)
    m = mgr.manifest(1)
    expected = state_bytes(saved["model"]) + state_bytes(saved["optim"]["state"])
    check_balance(m, root, expected, "DDP 4 ranks, 24 equal layers + Adam")
    print(f"[DDP 4 ranks] bytes read per rank on restore: {[o['read_bytes'] for o in outs]}")
    sd = mgr.load(1)
    assert_bit_equal(sd["model"], saved["model"])
    assert_bit_equal(sd["optim"]["state"], saved["optim"]["state"])


# -- FSDP2 --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fsdp") / "ckpt")


@pytest.fixture(scope="module")
def fsdp4(fsdp_root: str) -> list[dict[str, Any]]:
    """4 FSDP2 ranks train, save step 1 and restore it over a perturbed model."""
    return values(run_ranks(W.fsdp_job, 4, fsdp_root, {"seed": 0, "save": 1}, timeout=200))


@pytest.fixture(scope="module")
def fsdp2(fsdp_root: str, fsdp4: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """2 FSDP2 ranks restore step 1 (saved by 4), train, save step 2 and restore it."""
    return values(
        run_ranks(W.fsdp_job, 2, fsdp_root, {"seed": 5, "restore": [1], "save": 2, "check_partial": True}, timeout=200)
    )


def _state_bytes_fsdp(full: dict[str, Any]) -> int:
    return state_bytes(full["model"]) + state_bytes(full["optim"]["state"]) + state_bytes(full["rep"])


@pytest.mark.timeout(300)
def test_fsdp2_four_ranks_save_restore(fsdp_root: str, fsdp4: list[dict[str, Any]]) -> None:
    saved = fsdp4[0]["saved"]
    assert_bit_equal(fsdp4[0]["restored"]["same"], saved)
    mgr = CheckpointManager(fsdp_root)
    m = mgr.manifest(1)
    assert m.world_size == 4
    assert_exact_cover(m)

    # Shards by their owners, replicated placements once: 1 piece for the Replicate() DTensor, 2 for the
    # [Replicate, Shard(0)] one on the 2x2 mesh; every rank writes its shard of a weight; the 3-row head is
    # written by ranks 0-2 (rank 3's shard is empty).
    def writers(key: str) -> set[int]:
        return {int(_RANK_RE.search(p.file).group(1)) for p in m.tensors[key].pieces}

    assert len(m.tensors["rep"].pieces) == 1
    assert len(m.tensors["hsdp"].pieces) == 2 and len(writers("hsdp")) == 2
    assert writers("model/0.weight") == {0, 1, 2, 3}
    assert writers("optim/state/0.weight/exp_avg") == {0, 1, 2, 3}
    assert writers("model/6.weight") == {0, 1, 2}
    rng = sum(m.tensors[k].shape[0] for k in m.tensors if "~rank" in k)
    expected = _state_bytes_fsdp(saved) + 10 * 6 * 4 + rng
    per_rank = bytes_by_rank(m)
    assert sum(per_rank) == expected
    print(f"\n[FSDP2 4 ranks] state={expected} B, written per rank={per_rank}, save {fsdp4[0]['save_seconds']:.2f}s")
    print(f"[FSDP2 4 ranks] bytes read per rank, same-world restore: {[o['read_bytes']['same'] for o in fsdp4]}")


@pytest.mark.timeout(300)
def test_fsdp2_reshard_4_to_2(fsdp4: list[dict[str, Any]], fsdp2: list[dict[str, Any]]) -> None:
    assert_bit_equal(fsdp2[0]["restored"][1], fsdp4[0]["saved"])
    assert all("Partial" in (o["partial"] or "") for o in fsdp2), "a Partial DTensor was not refused"
    assert_bit_equal(fsdp2[0]["restored"]["same"], fsdp2[0]["saved"])
    # Each rank reads the pieces that overlap its box, not the whole step (a piece straddling the box boundary
    # is read whole: its crc32c covers the whole piece).
    total = _state_bytes_fsdp(fsdp4[0]["saved"])
    reads = [o["read_bytes"][1] for o in fsdp2]
    print(f"\n[FSDP2 4->2] state={total} B, bytes read per rank={reads}")
    assert all(r < 0.6 * total for r in reads), reads


@pytest.mark.timeout(300)
def test_fsdp2_reshard_2_to_3(fsdp_root: str, fsdp4: list[dict[str, Any]], fsdp2: list[dict[str, Any]]) -> None:
    outs = values(run_ranks(W.fsdp_job, 3, fsdp_root, {"seed": 9, "restore": [2, 1]}, timeout=200))
    assert_bit_equal(outs[0]["restored"][2], fsdp2[0]["saved"])  # 2 -> 3
    assert_bit_equal(outs[0]["restored"][1], fsdp4[0]["saved"])  # 4 -> 3
    total = _state_bytes_fsdp(fsdp2[0]["saved"])
    reads = [o["read_bytes"][2] for o in outs]
    print(f"\n[FSDP2 2->3] state={total} B, bytes read per rank={reads}")
    assert all(r < 0.45 * total for r in reads), reads


@pytest.mark.timeout(300)
def test_fsdp2_reshard_4_to_1_and_load(fsdp_root: str, fsdp4: list[dict[str, Any]]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )

    saved = fsdp4[0]["saved"]
    mgr = CheckpointManager(fsdp_root)
    # One process, plain (unsharded) model: the same recipe as under FSDP2.
    model = W.make_mlp(layers=3, width=W.FSDP_WIDTH, out=3, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)
    msd, osd = get_state_dict(model, opt)
    mgr.restore({"model": msd, "optim": osd}, step=1)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    assert_bit_equal(get_model_state_dict(model), saved["model"])
    assert_bit_equal(get_optimizer_state_dict(model, opt), saved["optim"])
    # load() consolidates the sharded step into full tensors.
    sd = mgr.load(1)
    assert_bit_equal(sd["model"], saved["model"])
    assert_bit_equal(sd["optim"]["state"], saved["optim"]["state"])
    assert_bit_equal(sd["rep"], saved["rep"])
    assert_bit_equal(sd["hsdp"], torch.arange(10 * 6.0).reshape(10, 6))


# -- faults -------------------------------------------------------------------------------------------------------
def _check_fault(root: str, results: list[Any], victim: int, timeout: float) -> None:
    mgr = CheckpointManager(root)
    assert mgr.steps() == [1], "a failed save became visible"
    for r, res in enumerate(results):
        if r == victim:
            continue
        assert res.ok, res.describe()
        err = res.value["error"]
        assert err is not None, f"rank {r} did not raise"
        assert err["type"] == "DistributedSaveError" and victim in err["failed_ranks"], err
        assert err["seconds"] < timeout + 5, f"rank {r} took {err['seconds']:.1f}s (timeout {timeout}s)"
        after = res.value["after"]
        assert after is not None and after["seconds"] < 1.0, after
        print(f"\n[fault] rank {r} raised after {err['seconds']:.2f}s: {err['message'][:300]}")
    saved = next(res.value["saved_1"] for r, res in enumerate(results) if r != victim)
    sd = mgr.load()  # "latest" is the previous step, bit-exact
    assert_bit_equal(sd["model"], saved["model"])
    assert_bit_equal(sd["optim"], saved["optim"])


@pytest.mark.faults
@pytest.mark.timeout(120)
def test_rank_killed_mid_save(tmp_path: Path) -> None:
    root, timeout = str(tmp_path / "ckpt"), 5.0
    results = run_ranks(W.fault_job, 3, root, "kill", 1, timeout, timeout=90)
    assert results[1].exitcode == -9, results[1].describe()
    _check_fault(root, results, victim=1, timeout=timeout)


@pytest.mark.faults
@pytest.mark.timeout(120)
def test_rank_stuck_mid_save(tmp_path: Path) -> None:
    root, timeout = str(tmp_path / "ckpt"), 4.0
    results = run_ranks(W.fault_job, 2, root, "stuck", 1, timeout, timeout=90)
    _check_fault(root, results, victim=1, timeout=timeout)
    # The stuck rank, arriving late, raises too and names itself (from what rank 0 recorded).
    late = results[1]
    assert late.ok, late.describe()
    assert late.value["error"]["type"] == "DistributedSaveError", late.value
    assert set(late.value["error"]["failed_ranks"]) == {1}, late.value["error"]
    print(f"[fault] stuck rank 1 raised: {late.value['error']['message'][:300]}")
    json.dumps(late.value["error"]["failed_ranks"])  # plain data, loggable
