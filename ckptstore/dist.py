"""Collectives used by the save/restore protocol, over torch.distributed (no home-made transport).

``LocalComm`` is the single-process case. ``TorchComm`` uses a dedicated gloo group (object collectives are
small metadata; a separate group keeps checkpoint traffic from interleaving with the training's own NCCL/gloo
collectives, which matters when a background thread saves) with a bounded timeout, so a dead rank turns into
an error instead of a hang.

Failures of a collective (a peer died, a peer is stuck past the timeout) surface as
:class:`~ckptstore.errors.DistributedSaveError` naming the rank(s) at fault. To name them, every rank records
in the job's rendezvous store how many checkpoint collectives it has entered; when one fails, the ranks that
never entered it are the dead or stuck ones. The store only carries these diagnostics, never checkpoint data.

Phases (after torch.distributed.checkpoint's ``_DistWrapper``): the save protocol and the restore run their
steps through :meth:`Comm.run_all`, :meth:`Comm.decide` and :meth:`Comm.gather_decide`. Each runs a function on
every rank (or on rank 0), catches what it raises, and moves the failures with the results, as
:class:`RankFailure` records, in the same collective. When any rank failed, every rank calls the same ``fail``
policy on the same list of failures and raises what it returns: the same typed error on every rank, naming the
failed ranks, and on the rank that failed its own exception with its traceback. The callers write no message
shapes of their own.

Example::

    comm = TorchComm(timeout_seconds=60)          # every rank, same order (creates a gloo group)
    plans = comm.gather(my_boxes, what="plan")     # list on rank 0, None elsewhere
    n = comm.decide("the step to restore", pick_step, fail=same_error)   # rank 0 decides, every rank gets it
"""

from __future__ import annotations

import copy
import datetime as _dt
import itertools
import json
import logging
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import CheckpointError, ConfigError, DistributedSaveError, IntegrityError, ManifestError

log = logging.getLogger("ckptstore")

T = TypeVar("T")

# TorchComm instances are created in the same order on every rank (like process groups), so a per-process
# counter gives every rank the same store namespace for the same communicator.
_instances = itertools.count()


@dataclass(frozen=True)
class RankFailure:
    """What one rank's phase function raised, as every rank receives it."""

    rank: int
    kind: str
    """The exception's class name (for messages)."""
    message: str
    error: BaseException | None = None
    """The exception itself: on its own rank the original, elsewhere a copy (a ckptstore error travels with its
    type and fields; other exceptions travel as ``kind`` and ``message`` only)."""

    @classmethod
    def of(cls, rank: int, e: BaseException) -> RankFailure:
        return cls(rank, type(e).__name__, str(e), e)

    def portable(self) -> RankFailure:
        """This failure as it travels to other ranks (see :func:`_portable`)."""
        return RankFailure(self.rank, self.kind, self.message, _portable(self.error) if self.error else None)

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.kind}: {self.message}"


#: A failure policy: from the failures of a phase (the same list on every rank, this rank's own entry holding its
#: original exception) and this rank's number, the exception this rank raises.
FailPolicy = Callable[[Sequence[RankFailure], int], BaseException]


def _portable(e: BaseException) -> BaseException | None:
    """``e`` when it can travel to another rank as it is; else a ckptstore error of its nearest importable class
    with the same message (e.g. a ``StorageError`` built at run time to also be a ``PermissionError``); None for
    exceptions that are not ckptstore errors."""
    if not isinstance(e, CheckpointError):
        return None
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # an attribute or a class that does not pickle
        pass
    for c in type(e).__mro__:
        mod = sys.modules.get(c.__module__)
        if issubclass(c, CheckpointError) and getattr(mod, c.__qualname__, None) is c:
            copy = c(str(e))
            for k in ("step", "errno", "failed_ranks", "missing", "unexpected"):
                if hasattr(e, k):
                    try:
                        setattr(copy, k, getattr(e, k))
                    except (AttributeError, TypeError):
                        pass
            return copy
    return None


def same_error(failures: Sequence[RankFailure], rank: int) -> BaseException:
    """Policy: every rank raises the error of one failed rank, with its type (``IntegrityError``,
    ``StateMismatchError``, ...) and the message prefixed by that rank. Damage (``IntegrityError``/
    ``ManifestError``) is chosen only when every failure is damage, so that a caller falling back on damage
    decides alike on every rank. A failure that is not a ckptstore error becomes a ``DistributedSaveError``."""
    damage = (IntegrityError, ManifestError)
    chosen = next((f for f in failures if not isinstance(f.error, damage)), failures[0])
    e = chosen.error
    if chosen.rank == rank and e is not None:
        return e  # this rank's own exception, traceback included
    if isinstance(e, CheckpointError):
        named = copy.copy(e)  # the received copy stays as it came (a policy may be asked more than once)
        named.args = (f"rank {chosen.rank}: {e}", *e.args[1:])
        return named
    return DistributedSaveError(str(chosen), failed_ranks={f.rank: f"{f.kind}: {f.message}" for f in failures})


def rank_errors(what: str, then: str = "", *, own_first: bool = False) -> FailPolicy:
    """Policy: ``DistributedSaveError("<what>: failed on N rank(s) (rank r: Kind: message; ...)<then>")`` with
    ``failed_ranks``, on every rank. A ``DistributedSaveError`` that a phase raised on purpose (it names the ranks
    at fault itself, e.g. diverged replicas) and a ``CheckpointExistsError`` (no rank's fault) are raised as they
    are. With ``own_first`` a rank that failed raises its own exception (a user's mistake is clearest in its own
    type), the others the ``DistributedSaveError`` naming it."""
    from .errors import CheckpointExistsError

    def fail(failures: Sequence[RankFailure], rank: int) -> BaseException:
        if own_first:
            own = next((f.error for f in failures if f.rank == rank and f.error is not None), None)
            if own is not None:
                return own
        for f in failures:
            if isinstance(f.error, (DistributedSaveError, CheckpointExistsError)):
                return f.error
        shown = "; ".join(map(str, failures[:8])) + (f" and {len(failures) - 8} more" if len(failures) > 8 else "")
        return DistributedSaveError(
            f"{what}: failed on {len(failures)} rank(s) ({shown}){then}",
            failed_ranks={f.rank: f"{f.kind}: {f.message}" for f in failures},
        )

    return fail


@dataclass(frozen=True)
class _Outcome:
    """What a deciding rank sends: the value, or the failures of the phase."""

    value: Any = None
    failures: tuple[RankFailure, ...] = ()


class Comm:
    """Single process: rank 0 of 1. Every collective is the identity.

    ``what`` names the protocol step in error messages (e.g. ``"gather of write reports for step 7"``).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, obj: Any, *, what: str = "gather") -> list[Any] | None:
        """Objects of every rank, on rank 0 (None elsewhere)."""
        return [obj]

    def all_gather(self, obj: Any, *, what: str = "all_gather") -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any, *, what: str = "broadcast") -> Any:
        """Rank 0's object, on every rank."""
        return obj

    def barrier(self, *, what: str = "barrier") -> None:
        return None

    def broadcast_tensor(self, t: Any, *, src: int, what: str = "broadcast") -> None:
        """Rank ``src``'s bytes of CPU tensor ``t`` into ``t`` on every rank (in place)."""
        return None

    def ensure(self) -> None:
        """Create what the collectives need (a process group), if not done yet. Called by the manager on the
        caller's thread at the start of every operation that runs collectives, so that group creation (itself
        a collective) happens at the same point of the program on every rank, never in a background thread."""
        return None

    # -- phases: run a function on every rank (or on rank 0), every rank learns every failure --------------------
    def _attempt(self, fn: Callable[[], T]) -> tuple[T | None, RankFailure | None]:
        try:
            return fn(), None
        except Exception as e:
            return None, RankFailure.of(self.rank, e)

    def _send(self, f: RankFailure | None) -> RankFailure | None:
        """What goes into a collective for this rank's failure (one process: nothing travels, nothing copied)."""
        return f.portable() if f is not None and self.is_distributed else f

    def _raise(self, failures: Sequence[RankFailure], own: RankFailure | None, fail: FailPolicy) -> None:
        if own is not None and own.error is not None and not self.is_distributed:
            raise own.error  # one process: the exception as it was raised
        mine = [own if own is not None and f.rank == own.rank else f for f in failures]
        err = fail(mine, self.rank)
        if own is not None and err is not own.error and own.error is not None:
            raise err from own.error
        raise err

    def run_all(self, what: str, fn: Callable[[], T], *, fail: FailPolicy) -> T:
        """Every rank runs ``fn``; one ``all_gather`` tells every rank who failed. Returns this rank's result, or
        raises on every rank what ``fail`` makes of the failures."""
        value, own = self._attempt(fn)
        failures = [f for f in self.all_gather(self._send(own), what=what) if f is not None]
        if failures:
            self._raise(failures, own, fail)
        return value  # type: ignore[return-value]

    def decide(self, what: str, fn: Callable[[], T], *, fail: FailPolicy) -> T:
        """Rank 0 runs ``fn`` and every rank gets its result (one ``broadcast``), or raises what ``fail`` makes of
        rank 0's failure."""
        own: RankFailure | None = None
        out = _Outcome()
        if self.rank == 0:
            value, own = self._attempt(fn)
            out = _Outcome(value, (self._send(own),) if own is not None else ())
        out = self.broadcast(out, what=what)
        if out.failures:
            self._raise(out.failures, own, fail)
        return out.value  # type: ignore[no-any-return]

    def gather_decide(
        self,
        what: str,
        local: Callable[[], Any],
        coordinate: Callable[[list[Any]], T],
        *,
        fail: FailPolicy,
    ) -> T:
        """Every rank runs ``local``; rank 0 gathers the results and, if no rank failed, runs ``coordinate`` on
        them (in rank order); every rank gets its result, or raises what ``fail`` makes of the failures. Two
        collectives (``gather``, ``broadcast``) whatever happens."""
        value, own = self._attempt(local)
        got = self.gather((value, self._send(own)), what=f"gather for {what}")
        out = _Outcome()
        if self.rank == 0:
            assert got is not None
            failures = tuple(f for _, f in got if f is not None)
            if not failures:
                result, own = self._attempt(lambda: coordinate([v for v, _ in got]))
                failures = (self._send(own),) if own is not None else ()
                out = _Outcome(result, failures)
            else:
                out = _Outcome(None, failures)
        out = self.broadcast(out, what=f"broadcast of {what}")
        if out.failures:
            self._raise(out.failures, own, fail)
        return out.value  # type: ignore[no-any-return]

    def sibling(self) -> Comm:
        """A communicator over the same ranks whose collectives never interleave with this one's.

        A background save runs its collectives on another thread than the training loop; two threads sharing
        one group could issue collectives in a different order on different ranks and pair the wrong messages.
        Collective call on every rank for torch.distributed (it creates a group).
        """
        return self


LocalComm = Comm


class TorchComm(Comm):
    """Collectives on a dedicated gloo group of an initialised torch.distributed job (gloo or NCCL default).

    Every collective is bounded by ``timeout_seconds``. A failed collective raises ``DistributedSaveError``
    whose ``failed_ranks`` names the ranks that never reached it, and leaves the communicator unusable: after a
    timeout the group's message streams are out of step, so later collectives fail fast instead of pairing
    the wrong messages. Recovering needs a new process group, in practice a restart of the job.

    Construction runs no collective: the gloo group is created by :meth:`ensure` (the first save/restore), so a
    manager built on a subset of the ranks (evaluation, export on rank 0) does not block. A collective that not
    every rank joins, group creation included, fails after the timeout naming the ranks that never came.
    """

    def __init__(self, timeout_seconds: float = 600.0, group: Any = None, store: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank(group) if group is not None else dist.get_rank()
        self.world_size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        timeout = _dt.timedelta(seconds=timeout_seconds)
        self.group = group  # None: created by ensure(), over every rank
        self.timeout = timeout
        self._store = store if store is not None else _default_store()
        self._ns = f"ckptstore/comm{next(_instances)}"
        self._seq = 0
        self._broken: DistributedSaveError | None = None
        self._ranks: list[int] | None = None  # the group's global ranks (None: all of them)

    def gather(self, obj: Any, *, what: str = "gather") -> list[Any] | None:
        def run() -> list[Any] | None:
            out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            self._dist.gather_object(obj, out, dst=0, group=self.group)
            return out

        return self._call(what, run)

    def all_gather(self, obj: Any, *, what: str = "all_gather") -> list[Any]:
        def run() -> list[Any]:
            out: list[Any] = [None] * self.world_size
            self._dist.all_gather_object(out, obj, group=self.group)
            return out

        return self._call(what, run)

    def broadcast(self, obj: Any, *, what: str = "broadcast") -> Any:
        def run() -> Any:
            box = [obj if self.rank == 0 else None]
            self._dist.broadcast_object_list(box, src=0, group=self.group)
            return box[0]

        return self._call(what, run)

    def barrier(self, *, what: str = "barrier") -> None:
        self._call(what, lambda: self._dist.barrier(group=self.group))

    def broadcast_tensor(self, t: Any, *, src: int, what: str = "broadcast") -> None:
        def run() -> None:
            self._dist.broadcast(t, src=self._dist.get_global_rank(self.group, src), group=self.group)

        self._call(what, run)

    def ensure(self) -> None:
        if self.group is not None:
            return

        def create() -> None:
            # gloo connects to every peer here: a rank that never calls this makes it time out, like any collective.
            self.group = self._dist.new_group(ranks=self._ranks, backend="gloo", timeout=self.timeout)

        self._call("creation of the checkpoint process group (every rank must call save/restore)", create)

    def sibling(self) -> Comm:
        ranks = self._dist.get_process_group_ranks(self.group) if self.group is not None else self._ranks
        sib = TorchComm(self.timeout.total_seconds(), store=self._store)
        sib._ranks = ranks
        sib.ensure()  # now, on the caller's thread, like any collective call of the manager
        return sib

    # -- failure handling -------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self._broken is not None:
            raise DistributedSaveError(
                f"rank {self.rank}: cannot run {what}: the checkpoint process group is unusable since an earlier "
                f"failure ({self._broken}); restart the job",
                failed_ranks=self._broken.failed_ranks,
            )
        if self.group is None and fn.__name__ != "create":
            self.ensure()
        self._seq += 1
        seq = self._seq
        self._put(f"seq/{self.rank}", str(seq))
        try:
            return fn()
        except Exception as e:  # gloo raises RuntimeError/DistBackendError; unpickling may raise anything
            failed = self._culprits(seq, what)
            why = "; ".join(f"rank {r} {m}" for r, m in sorted(failed.items())) or (
                "every rank had reached it, so the failed rank is unknown (one died or stalled inside it)"
            )
            err = DistributedSaveError(
                f"rank {self.rank}: {what} (checkpoint collective #{seq}) failed within the "
                f"{self.timeout.total_seconds():g}s timeout: {why} [{type(e).__name__}: {_first_line(e)}]",
                failed_ranks=failed,
            )
            self._broken = err
            log.error("%s", err)
            raise err from e

    def _culprits(self, seq: int, what: str) -> dict[int, str]:
        """Ranks that never entered collective ``seq``, merged with what other ranks already concluded."""
        if self._store is None:
            return {}
        failed: dict[int, str] = {}
        try:
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                got = self._get(f"seq/{r}")
                reached = int(got) if got is not None else 0
                if reached < seq:
                    failed[r] = f"never reached {what} (collective #{seq}; it got to #{reached}): dead or stuck"
            # A rank that arrives late sees every peer at this step; the peers that gave up on it already
            # recorded their verdict, so every surviving rank names the same culprit.
            for r in range(self.world_size):
                got = self._get(f"fail/{seq}/{r}") if r != self.rank else None
                if got is not None:
                    for k, v in json.loads(got).items():
                        failed.setdefault(int(k), v)
            self._put(f"fail/{seq}/{self.rank}", json.dumps({str(k): v for k, v in failed.items()}))
        except Exception as e:  # the store may be gone with the rank that hosted it
            log.warning("could not determine which rank failed (rendezvous store unreachable: %s)", e)
        return failed

    def _put(self, key: str, value: str) -> None:
        if self._store is None:
            return
        try:
            self._store.set(f"{self._ns}/{key}", value)
        except Exception as e:  # diagnostics only: never fail a collective because of them
            log.debug("ckptstore: store.set(%s) failed: %s", key, e)

    def _get(self, key: str) -> str | None:
        assert self._store is not None
        full = f"{self._ns}/{key}"
        # check() does not block; get() would wait for a key that a dead rank never writes.
        if not self._store.check([full]):
            return None
        return bytes(self._store.get(full)).decode()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else ""


def _default_store() -> Any:
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception as e:  # private API; failure only costs the names of failed ranks in error messages
        log.debug("ckptstore: no default store (%s); failed ranks will not be named", e)
        return None


def default_comm(timeout_seconds: float = 600.0) -> Comm:
    """``TorchComm`` when torch.distributed is initialised with more than one rank, else ``LocalComm``."""
    try:
        import torch.distributed as dist
    except ImportError:  # torch built without distributed support
        return LocalComm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm(timeout_seconds)
    return LocalComm()


def make_comm(comm: Comm | None, distributed: bool | None, timeout_seconds: float) -> Comm:
    """The communicator a manager uses: ``comm`` if given, else one process for ``distributed=False``, else
    :func:`default_comm` (``ConfigError`` when ``distributed=True`` finds no initialised multi-rank job)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise ConfigError(f"distributed must be True, False or None, got {distributed!r}")
    if comm is not None:
        return comm
    comm = LocalComm() if distributed is False else default_comm(timeout_seconds)
    if distributed and not comm.is_distributed:
        raise ConfigError(
            "distributed=True but torch.distributed is not initialised with more than one rank; call "
            "torch.distributed.init_process_group() first (or leave distributed=None)"
        )
    return comm
