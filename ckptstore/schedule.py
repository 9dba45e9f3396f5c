"""When to save: every N steps, every T seconds, and on preemption — decided identically on every rank.

A signal handler only sets a flag (it is not safe to save from inside a handler, and other ranks would not
know). At the next step boundary :meth:`SaveSchedule.should_save` runs one tiny all-reduce so every rank sees
the same answer: the time trigger uses rank 0's clock, the preemption flag is raised if *any* rank got the
signal. After a preemption save the job should exit (``schedule.preempted`` is True on every rank).

Example (works the same under torchrun and SLURM; both send SIGTERM before killing)::

    schedule = SaveSchedule(every_steps=500, every_seconds=1800)   # installs SIGTERM/SIGUSR1 handlers
    for step in range(start, total):
        train_step()
        if schedule.should_save(step):
            mgr.save(step, state, blocking=not schedule.preempted)
        if schedule.preempted:
            mgr.wait()
            break
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from .errors import ConfigError, DistributedSaveError

log = logging.getLogger("ckptstore")

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class SaveSchedule:
    """Decides at each step whether to checkpoint, with the same answer on every rank.

    ``every_steps``: save when ``step % every_steps == 0`` (step 0 excluded); ``every_seconds``: save when that
    much time passed since the last save (by rank 0's clock); ``signals``: signals that mean "you are being
    preempted" (empty to disable). ``comm``: a ckptstore ``Comm`` (default: the torch.distributed group when
    initialised, else single process).
    """

    def __init__(
        self,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        signals: Sequence[int] = DEFAULT_SIGNALS,
        comm: Any = None,
        clock: Callable[[], float] = time.monotonic,
        install: bool = True,
    ) -> None:
        if every_steps is not None and (
            isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1
        ):
            raise ConfigError(f"every_steps must be a positive int or None, got {every_steps!r}")
        if every_seconds is not None and (not isinstance(every_seconds, (int, float)) or every_seconds <= 0):
            raise ConfigError(f"every_seconds must be a positive number or None, got {every_seconds!r}")
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.signals = tuple(signals)
        self._clock = clock
        self._last_save = clock()
        self._signal_seen = threading.Event()
        self._received: int | None = None
        self._previous: dict[int, Any] = {}
        self.preempted = False
        """True on every rank once a preemption signal was agreed on (then save and exit)."""
        if comm is None:
            from .dist import default_comm

            comm = default_comm()
        if hasattr(comm, "ensure"):
            comm.ensure()  # its gloo group, now: every rank builds the schedule at the same point
        self.comm = comm
        if install and self.signals:
            self.install()

    # -- signals ---------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Install the signal handlers (main thread only, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("SaveSchedule signal handlers can only be installed from the main thread")
        for sig in self.signals:
            if sig in self._previous:
                continue
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: saving here could deadlock (locks held by the interrupted code) and other ranks
        # would not know. The step loop notices it at the next should_save().
        self._received = signum
        self._signal_seen.set()

    def request_preemption(self) -> None:
        """Behave as if a preemption signal arrived (for schedulers with their own notice mechanism)."""
        self._signal_seen.set()

    # -- decisions ---------------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True when this step should be checkpointed; identical on every rank (one small collective)."""
        by_steps = self.every_steps is not None and step > 0 and step % self.every_steps == 0
        now = self._clock()
        by_time = self.every_seconds is not None and now - self._last_save >= self.every_seconds
        local_pre = self._signal_seen.is_set()
        time_due, preempt = self._agree(by_time, local_pre)
        if preempt and not self.preempted:
            self.preempted = True
            if self._received is not None:
                log.warning(
                    "preemption signal %s received: saving at step %d", signal.Signals(self._received).name, step
                )
            else:
                log.warning("preemption agreed across ranks: saving at step %d", step)
        decision = by_steps or time_due or preempt
        if decision:
            self._last_save = now
        return decision

    def _agree(self, time_due: bool, preempted: bool) -> tuple[bool, bool]:
        if not getattr(self.comm, "is_distributed", False):
            return time_due, preempted
        import torch
        import torch.distributed as dist

        # Rank 0's clock decides the time trigger (clocks drift between hosts); any rank's signal counts.
        flags = torch.tensor([int(time_due) if self.comm.rank == 0 else 0, int(preempted)], dtype=torch.int32)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.comm.group)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses on a dead peer or a timeout
            raise DistributedSaveError(
                f"rank {self.comm.rank}: the ranks could not agree whether to save (a peer died, hung or left "
                f"the job: {type(e).__name__}: {e}); restart the job, it resumes from the latest step"
            ) from e
        return bool(flags[0]), bool(flags[1])

    def __enter__(self) -> SaveSchedule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


__all__ = ["DEFAULT_SIGNALS", "SaveSchedule"]
