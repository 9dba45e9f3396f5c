"""Saves that run in the background: :class:`PendingSave`, the one async-save thread, overlapped staging, and
what a forked child may (not) inherit of them.

At most one save is in flight: :meth:`Background.wait` is called before the next one starts. The protocol of a
background save runs at ``io.background_nice`` (the threads it starts inherit it); with overlapped staging the
copy itself runs first on a fresh thread at the caller's priority, while process-wide hooks
(:mod:`ckptstore.overlap`) make optimizer steps wait for it.

Example::

    bg = Background(nice=10)
    pending = bg.submit(job, protocol.run)
    result = bg.wait()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .. import overlap
from ..types import SaveResult
from .prepare import SaveJob

log = logging.getLogger("ckptstore")


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread (and the threads it starts, which inherit it) yield the CPU to training.

    Linux keeps a nice value per thread; elsewhere this is a no-op.
    """
    if not nice or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as e:  # e.g. a sandbox forbidding it: only scheduling is lost
        log.debug("could not lower the priority of the async save thread: %s", e)


class PendingSave:
    """Handle of a save running in the background (``save(..., blocking=False)``).

    Example::

        pending = mgr.save(step, state, blocking=False)
        ...                      # keep training
        result = pending.wait()  # re-raises a background error with its original type
    """

    def __init__(self, step: int, future: Future[SaveResult], copy: overlap.Copy | None = None) -> None:
        self.step = step
        self._future = future
        self._copy = copy
        self._reported = False  # an error the caller has already seen is not raised again by close()

    def done(self) -> bool:
        return self._future.done()

    def staged(self) -> bool:
        """True once the state has been copied to staging memory (always, unless ``overlap_staging``)."""
        return self._copy is None or self._copy.event.is_set()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Block until the state has been copied, after which it may be changed in any way; False on timeout.

        Only needed with ``overlap_staging=True``, before changing saved tensors other than by
        ``optimizer.step()`` or a module's forward (those wait by themselves)::

            pending = mgr.save(step, state, blocking=False)
            loss = model(batch).sum(); loss.backward()
            pending.wait_staged()
            ema.update(model)            # changes saved tensors in place
        """
        return self._copy is None or self._copy.wait(timeout)

    def wait(self, timeout: float | None = None) -> SaveResult:
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self._reported = True
            raise

    def exception(self) -> BaseException | None:
        if not self._future.done():
            return None
        e = self._future.exception()
        self._reported = self._reported or e is not None
        return e

    def settle(self) -> SaveResult | None:
        """The result for the manager's ``wait()``: an error the caller has already seen through this handle is
        not raised again."""
        if self._reported:
            self._future.exception()
            return None
        return self.wait()


class Background:
    """The async-save thread of one manager and its one pending save."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self.pending: PendingSave | None = None
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, job: SaveJob, run: Callable[[SaveJob], SaveResult]) -> PendingSave:
        """Run ``run(job)`` on the async-save thread (staged already: the caller may change its state at once)."""
        job.blocking_seconds = time.perf_counter() - job.t0
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="ckpt-async",
                initializer=lower_thread_priority,
                initargs=(self.nice,),
            )
        self.pending = PendingSave(job.step, self._executor.submit(run, job))
        return self.pending

    def overlapped(
        self,
        job: SaveJob,
        copy_rest: Callable[[], None],
        run: Callable[[SaveJob], SaveResult],
        *,
        distributed: bool,
    ) -> PendingSave:
        """Start the staging copy (``copy_rest``) and then ``run(job)`` on a fresh thread; return at once."""
        copy = overlap.begin()
        job.copy = copy
        job.blocking_seconds = time.perf_counter() - job.t0
        fut: Future[SaveResult] = Future()
        fut.set_running_or_notify_cancel()

        def body() -> None:
            try:
                try:
                    copy_rest()
                finally:
                    overlap.end(copy)  # training may go on, even if the copy failed
            except Exception as e:
                if not distributed:
                    fut.set_exception(e)
                    return
                job.prep_error, job.sources, job.specs = e, {}, []  # the other ranks must learn of it
            # The copy ran at the caller's priority (training waits for it); the write yields the CPU.
            lower_thread_priority(self.nice)
            try:
                fut.set_result(run(job))
            except BaseException as e:
                fut.set_exception(e)

        # A thread of its own, not an executor: executors refuse new work once the interpreter starts to exit,
        # and a save whose copy is already running should still commit then.
        try:
            threading.Thread(target=body, name=f"ckpt-overlap-{job.step}").start()
        except BaseException:
            overlap.end(copy)  # never leave optimizer steps waiting for a copy that will not run
            raise
        self.pending = PendingSave(job.step, fut, copy)
        return self.pending

    def wait(self) -> SaveResult | None:
        """Block until the pending save (if any) finished; re-raise its error unless already reported."""
        p, self.pending = self.pending, None
        return None if p is None else p.settle()

    def after_fork(self) -> None:
        """In a forked child: the parent's save is the parent's to commit (or not), never the child's."""
        self.pending = None
        self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
