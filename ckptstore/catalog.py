"""The catalog of what is committed under one root (one storage tier): steps, manifests, infos and history,
"best", pins, quarantine markers, deletion, retention and gc (with the liveness of save leases).

One :class:`Catalog` per tier; the manager holds them. Listing and reading go through :mod:`ckptstore.transfer`
(``committed_steps``, ``step_files``, ``read_manifest``); every on-disk name comes from :mod:`ckptstore.layout`
and :func:`ckptstore.format.manifest.step_dir`. No collectives: what only rank 0 may do takes ``rank``.

Example::

    cat = Catalog(open_storage("./checkpoints"), "primary")
    cat.steps(), cat.info(200).metrics, cat.best("loss").step
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from typing import Any, Literal

from ._oserror import reraise_typed
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ManifestError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .format.manifest import MANIFEST_NAME, MAX_STEP, Manifest, parse_step_dir, step_dir
from .layout import LEASE_PREFIX, PINS_DIR, StepFiles, parse_manifest_name, parse_quarantine_name, quarantine_name
from .storage import Storage
from .transfer import committed_steps, generation_of, parent_of, read_manifest, step_files, verify_step
from .types import CheckpointInfo

log = logging.getLogger("ckptstore")

LEASE_REFRESH_SECONDS = 30.0
"""How often a running save rewrites its lease (``.saving-<save_id>``)."""
LEASE_TTL_SECONDS = 120.0
"""A lease not refreshed for this long belongs to a save that died; gc then treats it as any leftover file."""


def check_step(step: Any) -> int:
    """``step`` if it is a valid step number, else ``UnsupportedValueError``."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise UnsupportedValueError(f"step must be an int from 0 to {MAX_STEP}, got {step!r}")
    return step


def fmt_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[-10:])) + (" (newest 10)" if len(steps) > 10 else "")


def proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot, Linux) of process ``pid``, or None if it does not run: with the pid
    it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):  # a zombie: dead, only not yet reaped by its parent
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _age(entry: Any, now: float) -> float:
    """Seconds since ``entry`` (a storage ``Entry``) was modified. Where the storage cannot tell, 0: what cannot
    be aged may belong to a save in progress, so gc leaves it alone."""
    return 0.0 if entry.mtime is None else now - entry.mtime


def _kind(entry: Any) -> str:
    return "directory" if entry.kind == "dir" else "file" if entry.kind == "file" else "symbolic link or special file"


class Catalog:
    """The committed steps of one storage tier, with a cache of the manifests read (they never change)."""

    def __init__(self, storage: Storage, tier: str = "primary", *, rank: int = 0) -> None:
        self.storage = storage
        self.tier = tier
        self.rank = rank
        self._lock = threading.Lock()
        self._manifests: dict[int, Manifest] = {}
        self._verified: set[tuple[int, int]] = set()

    @property
    def url(self) -> str:
        return self.storage.url

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    # -- listing and reading ----------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps (those with a visible generation), ascending."""
        with self._lock:
            known = set(self._manifests)
        return committed_steps(self.storage, known)

    def has(self, step: int) -> bool:
        """Whether ``step`` has a committed generation (one listing of its directory, none if cached)."""
        with self._lock:
            if step in self._manifests:
                return True
        return bool(step_files(self.storage, step).committed)

    def is_visible(self, step: int) -> bool:
        """Whether the cached manifest of ``step`` is its visible generation (read via :meth:`manifest`)."""
        with self._lock:
            return step in self._manifests

    def manifest(self, step: int, *, any_generation: bool = False) -> Manifest:
        """The visible generation's manifest of ``step`` (cached). ``any_generation``: for a step whose
        generations are all quarantined, the newest of them; asked for by number, a quarantined step is still
        read (and fully verified), so it can be inspected, or used again once repaired."""
        m = self._manifests.get(step)
        if m is not None:
            return m
        try:
            m, _ = read_manifest(self.storage, step)
        except CheckpointNotFoundError:
            files = step_files(self.storage, step)
            if any_generation and files.committed:
                return read_manifest(self.storage, step, files.committed[-1])[0]
            reason = self.quarantine_reason(step)
            why = f"it is quarantined: {reason[:300]}" if reason is not None else f"no {MANIFEST_NAME}"
            raise CheckpointNotFoundError(
                f"step {step} is not committed under {self.url} ({why}); committed steps: {fmt_steps(self.steps())}",
                step=step,
            ) from None
        self.remember(m)
        return m

    def remember(self, m: Manifest) -> None:
        """Cache ``m`` as the visible manifest of its step (after a commit, or a read)."""
        with self._lock:
            self._manifests[m.step] = m

    def forget(self, step: int) -> None:
        with self._lock:
            self._manifests.pop(step, None)

    def mark_verified(self, step: int, generation: int) -> None:
        with self._lock:
            self._verified.add((step, generation))

    def quarantine_reason(self, step: int, generation: int | None = None) -> str | None:
        """Why the newest (or the given) quarantined generation of ``step`` is out of service, or None."""
        try:
            files = step_files(self.storage, step)
            gens = sorted(files.quarantined) if generation is None else [generation]
            if not gens or gens[-1] not in files.quarantined:
                return None
            rel = f"{step_dir(step)}/{quarantine_name(gens[-1])}"
            entry = self.storage.stat(rel)
            if entry is None or entry.kind != "file" or entry.size > 65536:
                return "quarantined (the marker is not a small file)"
            body = json.loads(self.storage.read_bytes(rel))
            reason = body.get("reason") if isinstance(body, dict) else None
            return reason if isinstance(reason, str) else "quarantined"
        except (OSError, EOFError, ValueError):
            return "quarantined (the marker cannot be read)"

    def info_of(self, m: Manifest, *, quarantined: str | None = None) -> CheckpointInfo:
        verified = True if (m.step, generation_of(m)) in self._verified else None
        if quarantined is not None and quarantined.startswith("failed verification"):
            verified = False
        return CheckpointInfo(
            step=m.step,
            epoch=m.epoch,
            metrics=dict(m.metrics),
            metadata=dict(m.metadata),
            created_at=m.created_at,
            nbytes=m.nbytes,
            world_size=m.world_size,
            url=self.storage.url_of(step_dir(m.step)),
            tier=self.tier,
            generation=generation_of(m),
            parent=parent_of(m),
            verified=verified,
            quarantined=quarantined,
        )

    def info(self, step: int) -> CheckpointInfo:
        m = self.manifest(step, any_generation=True)
        reason = None if self.is_visible(step) else self.quarantine_reason(step, generation_of(m))
        return self.info_of(m, quarantined=reason)

    def history(self, *, include_quarantined: bool = False) -> list[CheckpointInfo]:
        """Every committed step's info, ascending; unreadable manifests are skipped with a warning.
        ``include_quarantined``: every generation of every step, quarantined ones too."""
        out = []
        if not include_quarantined:
            for s in self.steps():
                try:
                    out.append(self.info_of(self.manifest(s)))
                except (ManifestError, CheckpointNotFoundError) as e:
                    log.warning("skipping step %d (%s tier): %s", s, self.tier, e)
            return out
        for entry in self.storage.list_entries(""):
            s = parse_step_dir(entry.name)
            if s is not None and entry.kind == "dir":
                out += self._generations(s)
        return sorted(out, key=lambda i: (i.step, i.generation))

    def _generations(self, s: int) -> list[CheckpointInfo]:
        files = step_files(self.storage, s)
        out = []
        for g in files.committed:
            try:
                m, _ = read_manifest(self.storage, s, g)
            except (ManifestError, CheckpointNotFoundError, UnsafeCheckpointError) as e:
                log.warning("skipping step %d generation %d (%s tier): %s", s, g, self.tier, e)
                continue
            reason = self.quarantine_reason(s, g) if g in files.quarantined else None
            out.append(self.info_of(m, quarantined=reason))
        return out

    def best(self, metric: str = "loss", mode: Literal["min", "max"] = "min") -> CheckpointInfo | None:
        """The committed step with the best ``metric``, ranked by :func:`ckptstore.retention.rank_by_metric`."""
        from .retention import rank_by_metric

        ranked = rank_by_metric(self.history(), metric, mode)
        return ranked[0] if ranked else None

    # -- pins ---------------------------------------------------------------------------------------------------
    def pin(self, step: int) -> None:
        self.manifest(step)
        if self.rank == 0:
            self.storage.write_bytes(f"{PINS_DIR}/{step_dir(step)}", b"")

    def unpin(self, step: int) -> None:
        if self.rank == 0:
            self.storage.remove(f"{PINS_DIR}/{step_dir(step)}")

    def pinned(self) -> list[int]:
        return sorted(s for s in (parse_step_dir(n) for n in self.storage.list_dir(PINS_DIR)) if s is not None)

    # -- quarantine ---------------------------------------------------------------------------------------------
    def quarantine(self, step: int, reason: str, generation: int | None = None) -> None:
        """Take a generation of ``step`` out of service: a marker file beside its manifest (rank 0 only)."""
        g = generation if generation is not None else step_files(self.storage, step).visible
        if g is None:
            return
        body = json.dumps({"generation": g, "reason": reason, "at": time.time(), "host": platform.node()})
        try:
            self.storage.create_exclusive(f"{step_dir(step)}/{quarantine_name(g)}", body.encode())
        except FileExistsError:
            pass  # quarantined already (another rank or process)
        self.forget(step)
        log.warning("quarantined step %d generation %d (%s tier): %s", step, g, self.tier, reason)

    def quarantine_if_damaged(self, step: int, *, threads: int) -> None:
        """Rank 0, after a restore/load fell back from ``step``: re-verify it once (a transient short read must
        not retire a good step) and quarantine it if it still fails."""
        if self.rank != 0:
            return
        try:
            res = verify_step(self.storage, step, threads=threads)
        except CheckpointNotFoundError:
            return
        except (OSError, CheckpointError) as e:
            log.warning("could not re-verify step %d (%s tier) to quarantine it: %s", step, self.tier, e)
            return
        if not res.ok:
            problems = "; ".join(str(p) for p in res.problems[:3])
            self.quarantine(step, f"failed verification: {problems}")

    # -- deletion and retention ---------------------------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Delete a committed step (rank 0): every generation's manifest first, so the step disappears before its
        data goes."""
        if self.rank != 0:
            return
        prefix = step_dir(step)
        self.forget(step)
        names = self.storage.list_dir(prefix)
        if not names:
            raise CheckpointNotFoundError(f"step {step} does not exist under {self.url}", step=step)
        for name in names:
            if parse_manifest_name(name) is not None:
                self.storage.remove(f"{prefix}/{name}")
        self.storage.sync_dir(prefix)
        self.storage.remove_tree(prefix)
        if self.tier == "primary":
            self.storage.remove(f"{PINS_DIR}/{prefix}")

    def apply_retention(self, policy: Any, committed: int, protect: set[int]) -> tuple[int, ...]:
        """Delete what ``policy`` selects after ``committed`` was committed, never a step in ``protect``; returns
        the deleted steps. Runs after a commit: nothing that goes wrong here (an I/O error while listing, a custom
        policy raising) turns the committed save into an error; it is logged, and the next save retries."""
        if policy is None:
            return ()
        from .retention import select_deletions

        try:
            doomed = select_deletions(self.history(), policy, now=time.time(), pinned=self.pinned(), protect=protect)
        except Exception as e:
            log.warning("retention skipped after committing step %d (%s tier): %r", committed, self.tier, e)
            return ()
        deleted = []
        for s in doomed:
            try:
                self.delete(s)
                deleted.append(s)
                log.info("retention deleted step %d (%s tier)", s, self.tier)
            except Exception as e:
                log.warning("retention could not delete step %d (%s tier): %r", s, self.tier, e)
        return tuple(deleted)

    # -- gc -----------------------------------------------------------------------------------------------------
    def gc(self, *, min_age_seconds: float) -> list[str]:
        """Remove partial steps and unreferenced files older than ``min_age_seconds`` (rank 0); see
        :meth:`ckptstore.CheckpointManager.gc`."""
        if self.rank != 0:
            return []
        removed: list[str] = []
        now = time.time()
        try:
            for entry in self.storage.list_entries(""):
                s = parse_step_dir(entry.name)
                if s is None:
                    continue
                if entry.kind != "dir":
                    log.warning("gc: leaving %s alone: a %s, not a step directory", entry.name, _kind(entry))
                    continue
                removed += self._gc_step(entry.name, s, now, min_age_seconds)
            # Multipart uploads younger than min_age may belong to a save in progress elsewhere.
            self.storage.abort_incomplete_uploads("", older_than_seconds=min_age_seconds)
        except OSError as e:
            reraise_typed(e, f"gc of {self.url} stopped")
        return removed

    def lease_live(self, rel: str, entry: Any, now: float) -> bool:
        """A lease protects its step until it is ``LEASE_TTL_SECONDS`` old, or at once if it names a process of
        this host that no longer runs (a killed save)."""
        if _age(entry, now) >= LEASE_TTL_SECONDS:
            return False
        try:
            body = json.loads(self.storage.read_bytes(rel)) if entry.size <= 4096 else {}
        except (OSError, EOFError, ValueError):
            return True  # unreadable right now: trust its age
        if not isinstance(body, dict) or body.get("host") != platform.node() or not isinstance(body.get("pid"), int):
            return True
        if body.get("start") is None:  # no process start times here (not Linux): only the age tells
            return True
        start = proc_start(body["pid"])
        return start is not None and start == body.get("start")

    def _referenced(self, step: int, files: StepFiles) -> set[str] | None:
        """Files of a committed step that gc keeps (every generation's, artifacts'); None if unreadable."""
        keep: set[str] = set()
        try:
            for g in files.committed:  # quarantined generations too: kept for inspection
                keep |= set(read_manifest(self.storage, step, g)[0].files)
            # Artifacts committed next to the step (their sidecar exists) are part of it too.
            from .artifacts import list_artifacts, sidecar_name

            for a in list_artifacts(self.storage, step):
                keep |= {a.file, sidecar_name(a.name)}
        except CheckpointError as e:
            log.warning("gc: leaving step %d alone, its manifest is unreadable: %s", step, e)
            return None
        return keep

    def _gc_step(self, name: str, step: int, now: float, min_age: float) -> list[str]:
        entries = self.storage.list_entries(name)
        leases = [e for e in entries if e.name.startswith(LEASE_PREFIX) and e.kind == "file"]
        if any(self.lease_live(f"{name}/{e.name}", e, now) for e in leases):
            log.info("gc: leaving %s alone: a save is in progress there (%s)", name, leases[0].name)
            return []
        files = StepFiles.from_entries((e.name, e.kind) for e in entries)
        keep: set[str] = {e.name for e in entries if parse_manifest_name(e.name) or parse_quarantine_name(e.name)}
        if files.committed:
            referenced = self._referenced(step, files)
            if referenced is None:
                return []
            keep |= referenced
        removed = []
        for e in entries:
            rel = f"{name}/{e.name}"
            if e.name in keep:
                continue
            if e.kind != "file":
                log.warning("gc: leaving %s alone: a %s, not a file ckptstore writes", rel, _kind(e))
                continue
            if _age(e, now) >= min_age:
                self.storage.remove(rel)
                removed.append(rel)
        if not files.committed:
            self.storage.remove_dir(name)  # only if empty: a save may be creating files in it right now
        return removed


class Lineage:
    """Where the next save continues from: the (step, generation) of the last save or restore, and the step a
    restore went back to while newer steps may exist (they are superseded at the next save)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_saved: tuple[int, int] | None = None
        self.restored: tuple[int, int] | None = None

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    def saved(self, step: int, generation: int) -> None:
        with self._lock:
            self.last_saved, self.restored = (step, generation), None

    def restored_from(self, step: int, generation: int) -> None:
        with self._lock:
            # The restore is now what the next save continues from, not a step saved before it.
            self.restored, self.last_saved = (step, generation), None

    def parent_for(self, step: int, tiers: Any) -> tuple[int, int] | None:
        """Rank 0, at the start of a save of ``step``: the (step, generation) it continues from.

        After a restore of an older step, a save at or below a step that exists means the run went back in time
        (a fallback after damage, or on purpose after a loss spike): every visible step newer than the restored
        one belongs to the abandoned timeline and is quarantined as superseded, on every tier, before this save
        commits, so ``latest`` never returns to it and the same step numbers can be saved again as new
        generations. A save above every existing step (training simply went on, e.g. after restoring an old
        step into an evaluation model) supersedes nothing."""
        restored = self.restored
        if restored is None:
            return self.last_saved
        newer = {t: [x for x in tiers.get(t).steps() if x > restored[0]] for t in tiers.names}
        if not any(x >= step for xs in newer.values() for x in xs):
            return self.last_saved or restored
        why = f"superseded: the run resumed from step {restored[0]} and saved step {step} on a new timeline"
        for tier, xs in newer.items():
            for x in xs:
                tiers.get(tier).quarantine(x, why)
        return restored
