"""Which step a restore or load reads: the candidates, decided once, and one verify-and-fall-back loop.

``step`` is an int, ``"latest"`` or ``"best"``. :func:`choose` lists the (step, tier) candidates best first (each
step's primary copy before its mirror copy) on rank 0 of the reading group and hands the list to every rank:
ranks listing the storage themselves could disagree while a save commits. ``restore`` reads on every rank of the
job; ``load`` reads in the calling process only (it may run on one rank alone), so its group is that process.

:func:`first_good` is the loop both use: try each candidate; on damage (``IntegrityError``/``ManifestError``)
fall back to the next one only where that is allowed (``"latest"``, or the mirror copy of the same step), else
raise; once one succeeds, re-verify the steps fallen back from and quarantine those still damaged.

Example::

    cands = choose("latest", tiers, comm)
    value = first_good("latest", cands, lambda step, tier: read(step, tier), tiers=tiers, threads=8)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypeVar

from ..catalog import check_step
from ..dist import Comm, same_error
from ..errors import CheckpointNotFoundError, IntegrityError, ManifestError
from ..tiers import Tiers

log = logging.getLogger("ckptstore")

T = TypeVar("T")
StepSpec = int | Literal["latest", "best"]
Candidate = tuple[int, str]


def candidates(step: StepSpec, tiers: Tiers) -> list[Candidate]:
    """(step, tier) pairs to try, best first. Each step's primary copy comes before its mirror copy."""
    if step == "best":
        b = tiers.primary.best()
        if b is None:
            raise CheckpointNotFoundError(
                f"no committed step under {tiers.primary.url} has a finite numeric 'loss' metric"
            )
        wanted = [b.step]
    elif step == "latest":
        on = {t: set(tiers.get(t).steps()) for t in tiers.names}
        steps = sorted(set().union(*on.values()), reverse=True)
        return [(s, t) for s in steps for t in tiers.names if s in on[t]]
    else:
        wanted = [check_step(step)]
    # One existence check per tier for the step asked for, not a listing of every step (a LIST plus a HEAD per
    # step on S3).
    out = [(s, t) for s in wanted for t in tiers.names if tiers.get(t).has(s)]
    return out or [(wanted[0], "primary")]  # reading it raises a CheckpointNotFoundError listing the steps


def choose(step: StepSpec, tiers: Tiers, comm: Comm) -> list[Candidate]:
    """The candidates, decided by rank 0 of ``comm``; a failure to decide is raised on every rank."""
    return comm.decide(f"choice of the step to restore ({step!r})", lambda: candidates(step, tiers), fail=same_error)


def first_good(
    step: StepSpec,
    cands: list[Candidate],
    attempt: Callable[[int, str], T],
    *,
    tiers: Tiers,
    threads: int,
) -> T:
    """The result of ``attempt(step, tier)`` for the first candidate that reads and verifies.

    ``attempt`` must raise the same error type on every rank of the reading group (the restore phases do), so
    that every rank falls back, or stops, alike."""
    if not cands:
        raise CheckpointNotFoundError(f"no committed step under {tiers.primary.url}")
    failed: list[Candidate] = []  # fallen back from: re-verified and quarantined once one succeeds
    last: BaseException | None = None
    for i, (s, tier) in enumerate(cands):
        try:
            value = attempt(s, tier)
        except (IntegrityError, ManifestError) as e:
            same_step_next = i + 1 < len(cands) and cands[i + 1][0] == s  # the mirror's copy of this step
            if step != "latest" and not same_step_next:
                raise
            log.warning(
                "step %d (%s tier) does not verify (%s); falling back to %s",
                s,
                tier,
                e,
                "its mirror copy" if same_step_next else "the previous step",
            )
            last = e
            failed.append((s, tier))
            continue
        for bad_step, bad_tier in failed:
            tiers.get(bad_tier).quarantine_if_damaged(bad_step, threads=threads)
        return value
    assert last is not None
    raise last
