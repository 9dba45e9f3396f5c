"""SaveSchedule: step and time triggers, and a real signal turning into an agreed preemption save."""

from __future__ import annotations

import os
import signal

import pytest

from ckptstore.errors import ConfigError, DistributedSaveError
from ckptstore.schedule import SaveSchedule


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_every_steps() -> None:
    s = SaveSchedule(every_steps=3, signals=())
    assert [step for step in range(10) if s.should_save(step)] == [3, 6, 9]
    assert not s.preempted


def test_every_seconds_uses_time_since_last_save() -> None:
    clock = FakeClock()
    s = SaveSchedule(every_seconds=10, signals=(), clock=clock)
    assert not s.should_save(1)
    clock.t = 9.9
    assert not s.should_save(2)
    clock.t = 10.0
    assert s.should_save(3)
    clock.t = 15.0
    assert not s.should_save(4)  # the clock restarted at the last save
    clock.t = 20.5
    assert s.should_save(5)


def test_real_signal_sets_preemption_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with SaveSchedule(every_steps=1000, signals=(signal.SIGUSR1,)) as s:
        assert not s.should_save(1)
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before the next bytecode
        assert s.should_save(2) and s.preempted
        assert s.should_save(3)  # stays preempted: the loop is expected to exit
    assert signal.getsignal(signal.SIGUSR1) == before


def test_request_preemption_without_signal() -> None:
    s = SaveSchedule(signals=())
    s.request_preemption()
    assert s.should_save(7) and s.preempted


@pytest.mark.parametrize("kw", [{"every_steps": 0}, {"every_steps": 1.5}, {"every_seconds": -1}, {"every_steps": True}])
def test_bad_arguments(kw: dict) -> None:
    with pytest.raises(ConfigError):
        SaveSchedule(signals=(), **kw)


def test_manager_on_preemption_then_save_and_stop(tmp_path) -> None:
    import torch

    from ckptstore import CheckpointManager

    mgr = CheckpointManager(str(tmp_path / "c"))
    with mgr.on_preemption(signals=(signal.SIGUSR2,), every_steps=100) as schedule:
        saved = []
        for step in range(1, 50):
            if step == 7:
                os.kill(os.getpid(), signal.SIGUSR2)
            if schedule.should_save(step):
                mgr.save(step, {"w": torch.full((3,), float(step))})
                saved.append(step)
            if schedule.preempted:
                break
    assert saved == [7] and mgr.steps() == [7]


def test_failed_agreement_is_a_typed_error() -> None:
    # A collective that cannot complete (here: no process group at all) surfaces as DistributedSaveError.
    class BrokenComm:
        is_distributed = True
        rank = 1
        group = None

    sched = SaveSchedule(every_steps=10, comm=BrokenComm(), install=False)
    with pytest.raises(DistributedSaveError, match="could not agree") as e:
        sched.should_save(3)
    assert e.value.__cause__ is not None
