"""Async saves with ``overlap_staging=True``: the staging copy runs in the background and the places where
training changes state in place (optimizer steps, forwards of modules with buffers) wait for it.

The background copy is held back by a gate (``StagingPool.stage`` waits for an event off the main thread) so
that every test decides exactly when it finishes; nothing here depends on timing luck. Tensors the tests change
are larger than ``overlap.SMALL_BYTES`` (64 KiB), which ``save()`` copies at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptstore import CheckpointManager, PendingSave
from ckptstore.errors import ConfigError, StateChangedError
from ckptstore.staging import StagingPool


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Staging copies wait until the test sets this event."""
    ev = threading.Event()
    orig = StagingPool.stage

    def held(self: StagingPool, key: str, t: torch.Tensor) -> torch.Tensor:
        # Only the background copy: small tensors are copied by save() itself, on the test's thread.
        if threading.current_thread() is not threading.main_thread():
            assert ev.wait(30), "test never released the staging gate"
        return orig(self, key, t)

    monkeypatch.setattr(StagingPool, "stage", held)
    yield ev
    ev.set()  # never leave a copy (and the hooks) hanging after a failed test


def _release_later(ev: threading.Event, seconds: float = 0.2) -> None:
    threading.Timer(seconds, ev.set).start()


def _mgr(tmp_path: Path, **kw: Any) -> CheckpointManager:
    return CheckpointManager(str(tmp_path / "ckpt"), overlap_staging=True, **kw)


def _clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def test_optimizer_step_waits_for_the_copy(tmp_path: Path, gate: threading.Event) -> None:
    torch.manual_seed(0)
    model = nn.Linear(256, 256)  # a 256 KiB weight
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    want_model, want_opt = _clone(model.state_dict()), _clone(opt.state_dict()["state"][0])
    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"model": model, "optim": opt}, blocking=False)
        assert isinstance(pending, PendingSave)
        assert not pending.staged()  # save() returned before the copy was made
        model(torch.randn(4, 256)).sum().backward()  # a Linear has no buffers: its forward does not wait
        assert not pending.staged()
        _release_later(gate)
        opt.step()  # changes every saved tensor in place: must wait for the copy first
        assert pending.staged()
        res = pending.wait()
        assert res.staging_wait_seconds >= 0.1  # the optimizer step really waited for the gate
        assert res.blocking_seconds >= res.staging_wait_seconds
        assert not torch.equal(model.weight, want_model["weight"])  # the step did change the state ...
        got = mgr.load(1)
    for k, v in want_model.items():  # ... after the copy: the checkpoint holds the state at call time
        assert torch.equal(got["model"][k], v), k
    for k, v in want_opt.items():
        assert torch.equal(got["optim"]["state"][0][k], v), k


class Accumulator(nn.Module):
    """Changes a large buffer (128 KiB, above ``overlap.SMALL_BYTES``) in place in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("acc", torch.zeros(32768))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.acc.add_(x.mean())
        return x


def test_forward_of_a_module_with_a_large_buffer_waits(tmp_path: Path, gate: threading.Event) -> None:
    model = nn.Sequential(nn.Linear(16, 16), Accumulator())
    model(torch.ones(2, 16))
    want = _clone(model.state_dict())
    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"model": model}, blocking=False)
        _release_later(gate)
        model(torch.ones(2, 16))
        assert pending.staged()  # the Accumulator's forward waited for the copy
        pending.wait()
        assert not torch.equal(model[1].acc, want["1.acc"])
        got = mgr.load(1)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_batchnorm_statistics_are_taken_at_call_time(tmp_path: Path, gate: threading.Event, compiled: bool) -> None:
    # Small tensors are copied before save() returns: a forward may update BatchNorm's running statistics at
    # once, without waiting, also inside a compiled graph that no hook sees.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256)).train()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    run(torch.randn(8, 256)).sum().backward()
    want = _clone(model.state_dict())
    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"model": model}, blocking=False)
        run(torch.randn(8, 256) + 3).sum().backward()
        assert not pending.staged()  # the forward did not wait: the large weights are still being copied
        gate.set()
        pending.wait()
        assert not torch.equal(model[1].running_mean, want["1.running_mean"])
        got = mgr.load(1)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_unguarded_in_place_change_fails_the_save(tmp_path: Path, gate: threading.Event) -> None:
    w = torch.ones(1 << 15)
    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"w": w, "b": torch.zeros(3)}, blocking=False)
        w.mul_(2)  # not through an optimizer, no wait_staged(): the snapshot could mix old and new values
        gate.set()
        with pytest.raises(StateChangedError, match=r"step 1 was not saved: 'w' changed in place"):
            pending.wait()
        assert mgr.steps() == []  # nothing half-made was committed
        mgr.save(1, {"w": w})  # the manager is still usable; the same step can be saved again
        assert torch.equal(mgr.load(1)["w"], torch.full((1 << 15,), 2.0))


def test_wait_staged_then_change_freely(tmp_path: Path, gate: threading.Event) -> None:
    w = torch.ones(1 << 15)
    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"w": w}, blocking=False)
        assert pending.wait_staged(timeout=0.05) is False
        gate.set()
        assert pending.wait_staged(timeout=10) is True
        w.add_(5)  # after the copy: allowed, and not in the checkpoint
        assert pending.wait().staging_wait_seconds == 0.0
        assert torch.equal(mgr.load(1)["w"], torch.ones(1 << 15))


def test_json_values_and_pickles_are_taken_at_call_time(tmp_path: Path, gate: threading.Event) -> None:
    cfg = {"lr": [0.1, 0.2]}
    obj = {1, 2}  # a set: neither a tensor nor JSON, so it is pickled
    with _mgr(tmp_path, allow_pickle=True) as mgr:
        pending = mgr.save(1, {"w": torch.ones(1 << 15), "cfg": cfg, "obj": obj}, blocking=False)
        cfg["lr"].append(0.3)
        obj.add(3)
        gate.set()
        pending.wait()
        got = mgr.load(1, trusted=True)
    assert got["cfg"] == {"lr": [0.1, 0.2]} and got["obj"] == {1, 2}


def test_copy_error_keeps_its_type_and_releases_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orig = StagingPool.stage

    def broken(self: StagingPool, key: str, t: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is threading.main_thread():
            return orig(self, key, t)  # small tensors, copied by save() itself
        raise MemoryError("cannot allocate staging memory")

    monkeypatch.setattr(StagingPool, "stage", broken)
    model = nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"model": model}, blocking=False)
        model(torch.randn(2, 256)).sum().backward()
        opt.step()  # returns: a failed copy does not leave training waiting
        with pytest.raises(MemoryError):
            pending.wait()
        assert pending.staged() and mgr.steps() == []


def test_one_save_in_flight_and_sync_saves_unchanged(tmp_path: Path, gate: threading.Event) -> None:
    with _mgr(tmp_path) as mgr:
        p1 = mgr.save(1, {"w": torch.ones(1 << 15)}, blocking=False)
        _release_later(gate)
        res2 = mgr.save(2, {"w": torch.zeros(8)})  # waits for step 1 (at most one save in flight)
        assert p1.done() and mgr.steps() == [1, 2]
        assert res2.staging_wait_seconds == 0.0 and res2.blocking_seconds == res2.seconds


def test_overlap_staging_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="overlap_staging"):
        CheckpointManager(str(tmp_path / "a"), overlap_staging="yes")  # type: ignore[arg-type]
    mgr = CheckpointManager.from_config({"root": str(tmp_path / "b"), "overlap_staging": True})
    assert mgr.overlap_staging is True
    mgr.close()
    with pytest.raises(ConfigError, match="overlap_staging"):
        CheckpointManager.from_config({"root": str(tmp_path / "c"), "overlap_staging": 1})


def test_forward_hook_only_while_a_copy_runs(tmp_path: Path, gate: threading.Event) -> None:
    # A global forward hook takes every module call off torch's fast path: it must not outlive the copy.
    from torch.nn.modules import module as nn_module

    from ckptstore import overlap

    def ours() -> bool:
        return any(h is overlap._forward_pre_hook for h in nn_module._global_forward_pre_hooks.values())

    with _mgr(tmp_path) as mgr:
        pending = mgr.save(1, {"w": torch.ones(1 << 15)}, blocking=False)
        assert ours()
        gate.set()
        pending.wait()
        assert not ours()
