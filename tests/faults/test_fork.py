"""A manager used in a forked child never waits for the parent's background work (which does not exist there)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from tests.fixtures.faulty import Fault, inject

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def _run_in_child(fn, timeout: float = 30.0) -> int:
    """Fork, run ``fn`` in the child (exit code 0 on success, 1 on error), and return the exit code; a child still
    running after ``timeout`` is killed and reported as -SIGKILL (a hang)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fn()
            code = 0
        except BaseException as e:  # report and exit: never return into pytest in the child
            os.write(2, f"child failed: {e!r}\n".encode())
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def test_async_save_in_a_forked_child_does_not_hang(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "ck"))
    inject(mgr, Fault("delay", op="write", seconds=2.0, times=None))  # the parent's save is still running at fork
    pending = mgr.save(1, {"w": torch.ones(1000)}, blocking=False)

    def child() -> None:
        mgr.storage = mgr.storage.inner  # the child's writes are not slowed
        res = mgr.save(2, {"w": torch.full((1000,), 2.0)}, blocking=False).wait(timeout=20)
        assert res.step == 2
        mgr.close()

    assert _run_in_child(child) == 0
    assert pending.wait(timeout=60).step == 1  # the parent's own save commits as usual
    fresh = CheckpointManager(str(tmp_path / "ck"))
    assert fresh.steps() == [1, 2]
    assert torch.equal(fresh.load(2)["w"], torch.full((1000,), 2.0))
    mgr.close()


def test_optimizer_step_in_a_child_forked_during_an_overlapped_copy_does_not_wait(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(str(tmp_path / "ck"), overlap_staging=True)
    inject(mgr, Fault("delay", op="write", seconds=1.0, times=None))
    from ckptstore import overlap

    copy = overlap.begin()  # a staging copy in flight in the parent, as during an overlapped save
    try:

        def child() -> None:
            model(torch.randn(4, 512)).sum().backward()
            opt.step()  # the optimizer hook must not wait for the parent's copy

        assert _run_in_child(child, timeout=20) == 0
    finally:
        overlap.end(copy)
    mgr.close()
