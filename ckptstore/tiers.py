"""Tiered storage: commit on the (fast, local) primary, copy each committed step to the mirror in the background.

:class:`Tiers` holds the catalog of each tier, the mirror upload queue and the steps retention must leave alone
(being restored; committed on the primary but not yet on the mirror), all behind one lock. Retention after a
commit runs here, so the protect sets are read where they are kept.

Example::

    tiers = Tiers(Catalog(primary), Catalog(mirror, "mirror"), threads=8, retention=KeepLast(3))
    tiers.after_commit(200)          # rank 0: queue the upload, apply retention on the primary
    tiers.flush_mirror(timeout=None)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from .catalog import Catalog, fmt_steps
from .errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError, StorageError
from .format.manifest import step_dir
from .transfer import copy_step

log = logging.getLogger("ckptstore")


class Tiers:
    """The primary catalog, the optional mirror catalog, and the mirror queue between them."""

    def __init__(self, primary: Catalog, mirror: Catalog | None, *, threads: int, retention: Any) -> None:
        self.primary = primary
        self.mirror = mirror
        self.threads = threads
        self.retention = retention
        self._lock = threading.Lock()
        self._restoring: set[int] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[Any]] = []
        # Steps on the primary that the mirror still lacks (queued, in flight or failed): primary retention never
        # deletes them, and failed ones are retried at the next save, flush_mirror() and close().
        self._pending: set[int] = set()
        self._failed: dict[int, BaseException] = {}
        self._backlog_checked = False

    @property
    def names(self) -> list[str]:
        return ["primary"] + (["mirror"] if self.mirror is not None else [])

    def get(self, tier: str) -> Catalog:
        if tier == "primary":
            return self.primary
        if tier == "mirror" and self.mirror is not None:
            return self.mirror
        raise ConfigError(f"unknown storage tier {tier!r} (this manager has: {', '.join(self.names)})")

    def steps(self, tier: str) -> list[int]:
        if tier == "all":
            return sorted({s for t in self.names for s in self.get(t).steps()})
        return self.get(tier).steps()

    @contextmanager
    def restoring(self, step: int) -> Iterator[None]:
        """Protect ``step`` from retention while it is being read."""
        with self._lock:
            self._restoring.add(step)
        try:
            yield
        finally:
            with self._lock:
                self._restoring.discard(step)

    # -- after a commit -------------------------------------------------------------------------------------------
    def after_commit(self, step: int) -> tuple[int, ...]:
        """Rank 0, after committing ``step`` on the primary: queue it for the mirror, then apply retention."""
        if self.mirror is not None:
            self.enqueue_mirror(step)
        return self.apply_retention(step, "primary")

    def apply_retention(self, committed: int, tier: str = "primary") -> tuple[int, ...]:
        with self._lock:
            # Never delete what is being restored, or a step still waiting to be copied to the mirror.
            protect = {committed, *self._restoring, *(self._pending if tier == "primary" else ())}
        return self.get(tier).apply_retention(self.retention, committed, protect)

    # -- the mirror queue ---------------------------------------------------------------------------------------
    def _backlog(self) -> set[int]:
        """Once per manager: committed primary steps newer than anything on the mirror (uploads an earlier
        process did not finish)."""
        if self._backlog_checked or self.mirror is None:
            return set()
        self._backlog_checked = True
        try:
            on_mirror = self.mirror.steps()
            return {s for s in self.primary.steps() if s > (on_mirror[-1] if on_mirror else -1)}
        except OSError as e:
            log.warning("could not list the mirror %s to resume unfinished uploads: %s", self.mirror.url, e)
            return set()

    def enqueue_mirror(self, step: int | None = None) -> None:
        """Queue ``step`` for the mirror, after every earlier step the mirror still lacks (failed uploads of this
        process, and the backlog of earlier processes)."""
        backlog = self._backlog()
        with self._lock:
            todo = set(self._failed) | (backlog - self._pending)
            if step is not None:
                todo.add(step)
            if todo and self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-mirror")
            for s in sorted(todo):
                self._pending.add(s)  # from now on protected from primary retention
                self._failed.pop(s, None)
                assert self._executor is not None
                self._futures.append(self._executor.submit(self._mirror_one, s))

    def _mirror_one(self, step: int) -> int:
        assert self.mirror is not None
        try:
            t0 = time.perf_counter()
            res = copy_step(self.primary.storage, self.mirror.storage, step, threads=self.threads)
            log.info(
                "mirrored step %d to %s: %.1f MiB in %.2fs",
                step,
                self.mirror.storage.url_of(step_dir(step)),
                res.nbytes / 2**20,
                time.perf_counter() - t0,
            )
        except CheckpointExistsError:
            log.info("step %d is already on the mirror", step)
        except CheckpointNotFoundError:
            log.info("step %d is no longer on the primary; nothing to mirror", step)
        except Exception as e:
            # The step stays pending (primary retention keeps it) and is retried at the next save, flush_mirror()
            # and close().
            log.error("could not mirror step %d to %s (kept on the primary, will retry): %s", step, self.mirror.url, e)
            with self._lock:
                self._failed[step] = e
            raise
        with self._lock:
            self._pending.discard(step)
            self._failed.pop(step, None)
        self.apply_retention(step, "mirror")
        return step

    def drain(self, timeout: float | None) -> list[int]:
        """Wait for the queued uploads; the steps that reached the mirror (failures are kept in ``_failed``)."""
        with self._lock:
            futs, self._futures = self._futures, []
        done: list[int] = []
        for f in futs:
            try:
                done.append(f.result(timeout))
            except Exception:
                pass  # recorded in _failed by _mirror_one
        return done

    def flush_mirror(self, timeout: float | None, *, rank: int) -> list[int]:
        """Wait until every queued step is copied, trying failed uploads once more; ``StorageError`` naming what
        still fails."""
        if self.mirror is None:
            return []
        done = self.drain(timeout)
        if self._failed and rank == 0:
            self.enqueue_mirror()  # one more try of what failed
            done += self.drain(timeout)
        with self._lock:
            failed = dict(self._failed)
        if failed:
            first = next(iter(failed.values()))
            err = StorageError(
                f"steps {fmt_steps(sorted(failed))} could not be copied to the mirror {self.mirror.url} "
                f"({type(first).__name__}: {first}); they stay on {self.primary.url}, kept by retention, and are "
                "retried at the next save, flush_mirror() or close()"
            )
            if isinstance(first, OSError):
                err.errno = first.errno
            raise err from first
        return sorted(done)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def after_fork(self) -> None:
        """In a forked child: the parent's uploads do not exist here; queued work is re-checked from the storage."""
        self._lock = threading.Lock()
        self._executor = None
        self._futures = []
        self._backlog_checked = False
        self._restoring = set()
        for c in (self.primary, self.mirror):
            if c is not None:
                c.after_fork()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
