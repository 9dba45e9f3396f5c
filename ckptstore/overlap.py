"""Overlapped staging: the staging copy of an async save runs while training goes on, and the places where
training changes its state in place wait for it.

With ``CheckpointManager(..., overlap_staging=True)``, ``save(..., blocking=False)`` returns after flattening
the state (milliseconds); the copy into staging memory then runs on a background thread while the next batch
is loaded and the forward and backward passes run. Two process-wide hooks keep the snapshot equal to the state
at call time (the optimizer hook stays from the first such save on; the forward hook is there only while a
copy runs):

* every ``torch.optim.Optimizer.step()`` (a global optimizer step pre-hook) waits until the copy is done: it is
  what changes parameters and optimizer state;
* tensors up to ``SMALL_BYTES`` (64 KiB) are copied before ``save()`` returns: forwards change buffers such as
  BatchNorm's running statistics in place, also inside compiled graphs that no hook sees;
* the forward of a module that owns a larger buffer (a global forward pre-hook) waits for the copy, as does
  the forward of a ``DistributedDataParallel`` wrapper that broadcasts such buffers.

Anything else that changes a saved tensor in place before the copy is done (a hand-written EMA update, ``with
torch.no_grad(): p.mul_(...)``) must call ``PendingSave.wait_staged()`` first. Such a change is caught by the
tensors' version counters: the save then fails with :class:`~ckptstore.errors.StateChangedError` instead of
writing a mix of old and new values. That net has holes: writes that bypass autograd's version counter (through
``.data`` or a NumPy view) cannot be seen, and torch bumps the counter when an in-place op ends, so an op still
running at the moment a tensor's copy is checked goes unnoticed. Use ``overlap_staging=False``, the default,
unless training changes saved tensors only through optimizer steps and forwards.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

SMALL_BYTES = 64 * 1024
"""Tensors up to this size are copied when ``save()`` is called, not in the background. That covers what
forwards change in place: BatchNorm statistics and counters, step counts. Compiled graphs (``torch.compile``)
and DDP's buffer broadcast change them without passing through a hook, and copying them costs microseconds."""

_lock = threading.Lock()
_in_flight: set[Copy] = set()
_optimizer_hook_installed = False
_forward_hook: Any = None


class Copy:
    """One staging copy in flight: hooks wait on it; ``waited`` sums the seconds training waited for it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.waited = 0.0

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)


def begin() -> Copy:
    """Register a staging copy that is about to start; hooks wait for it until :func:`end` is called."""
    global _optimizer_hook_installed, _forward_hook
    copy = Copy()
    with _lock:
        if not _optimizer_hook_installed:
            # Never removed: torch iterates the optimizer hook dict while calling the hooks, so removing one from
            # another thread could break a running step. Once per optimizer step it costs one truthiness test.
            register_optimizer_step_pre_hook(_optimizer_pre_hook)
            _optimizer_hook_installed = True
        if _forward_hook is None:
            # Only while a copy is in flight: any global forward hook takes every module call off torch's fast
            # path (~2 us per call). torch copies this dict before calling the hooks, so removal is safe.
            _forward_hook = register_module_forward_pre_hook(_forward_pre_hook)
        _in_flight.add(copy)
    return copy


def end(copy: Copy) -> None:
    """The staging copy finished (or failed): release whoever waits for it."""
    global _forward_hook
    with _lock:
        _in_flight.discard(copy)
        if not _in_flight and _forward_hook is not None:
            _forward_hook.remove()
            _forward_hook = None
    copy.event.set()


def wait_all() -> None:
    """Block until no staging copy is in flight (what the hooks do)."""
    with _lock:
        copies = list(_in_flight)
    for c in copies:
        t0 = time.perf_counter()
        c.event.wait()
        c.waited += time.perf_counter() - t0


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's copy threads: nothing it waits for would ever finish."""
    global _lock, _forward_hook
    _lock = threading.Lock()  # the parent may have held it at the fork
    for c in _in_flight:
        c.event.set()
    _in_flight.clear()
    if _forward_hook is not None:
        _forward_hook.remove()
        _forward_hook = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _optimizer_pre_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _in_flight:
        wait_all()


def is_small(t: torch.Tensor) -> bool:
    """Copied at call time even with overlapped staging (see ``SMALL_BYTES``)."""
    return t.numel() * t.element_size() <= SMALL_BYTES


def _forward_pre_hook(module: torch.nn.Module, args: Any) -> None:
    if _in_flight and (_has_large(module._buffers.values()) or _syncs_large_buffers(module)):
        wait_all()


def _has_large(tensors: Any) -> bool:
    return any(t is not None and not is_small(t) for t in tensors)


def _syncs_large_buffers(module: torch.nn.Module) -> bool:
    # DDP broadcasts the wrapped model's buffers from rank 0 at the start of its own forward, before the
    # forward hooks of the wrapped modules run.
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    if ddp is None or not isinstance(module, ddp.DistributedDataParallel):
        return False
    will_sync = getattr(module, "will_sync_module_buffers", None)
    if callable(will_sync) and not will_sync():
        return False
    return _has_large(getattr(module, "modules_buffers", None) or module.buffers())


__all__ = ["SMALL_BYTES", "Copy", "begin", "end", "is_small", "wait_all"]
