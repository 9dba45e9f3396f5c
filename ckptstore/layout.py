"""Names inside a step directory: manifest generations, quarantine markers, the in-progress lease.

Pure functions, no I/O. A step directory ``step-000000000200/`` holds the shard files of every save of that step
number, one manifest per *generation* and, for a generation taken out of service, a quarantine marker::

    manifest.json              generation 1 (the only one most steps ever have; what ckptstore 0.1 reads)
    manifest.g2.json           generation 2: the same step number saved again by a run that resumed from an
                               older step (after a failed verification, or on purpose after a loss spike)
    quarantined.g1.json        generation 1 failed verification or was superseded: kept for inspection,
                               never restored as "latest", never counted by retention
    .saving-<save_id>          lease of a save in progress (gc leaves the directory alone while it is fresh)

The *visible* generation of a step is its highest committed generation without a quarantine marker; a step
without one is not listed by ``steps()``. Committed manifests are never changed or removed by a later
generation: a marker is a new file beside them.

Example::

    assert manifest_name(1) == "manifest.json" and parse_manifest_name("manifest.g2.json") == 2
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

MANIFEST_NAME = "manifest.json"
PINS_DIR = "pins"
LEASE_PREFIX = ".saving-"
"""Name prefix of the lease file a running save keeps in its step directory (``.saving-<save_id>``)."""

_GEN_MANIFEST = re.compile(r"manifest\.g([1-9][0-9]{0,8})\.json")
_QUARANTINE = re.compile(r"quarantined\.g([1-9][0-9]{0,8})\.json")


def manifest_name(generation: int = 1) -> str:
    """``manifest.json`` for generation 1, ``manifest.g<N>.json`` after it."""
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError(f"generation must be a positive int, got {generation!r}")
    return MANIFEST_NAME if generation == 1 else f"manifest.g{generation}.json"


def parse_manifest_name(name: str) -> int | None:
    """The generation of a manifest file name, or None (only the canonical spelling counts)."""
    if name == MANIFEST_NAME:
        return 1
    m = _GEN_MANIFEST.fullmatch(name)
    return int(m.group(1)) if m and int(m.group(1)) >= 2 else None


def quarantine_name(generation: int) -> str:
    manifest_name(generation)  # validates
    return f"quarantined.g{generation}.json"


def parse_quarantine_name(name: str) -> int | None:
    m = _QUARANTINE.fullmatch(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class StepFiles:
    """What one listing of a step directory says about its generations (``entries``: ``(name, kind)`` pairs)."""

    committed: tuple[int, ...] = ()
    """Generations with a manifest file, ascending."""
    quarantined: frozenset[int] = field(default_factory=frozenset)
    """Generations with a quarantine marker."""

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, str]]) -> StepFiles:
        committed, quarantined = set(), set()
        for name, kind in entries:
            g = parse_manifest_name(name)
            if g is not None:
                # Whatever its kind: a FIFO or link named like a manifest is a damaged commit, which the reader
                # refuses (ManifestError) so that restore falls back, not a step that silently vanishes.
                committed.add(g)
            q = parse_quarantine_name(name)
            if q is not None and kind == "file":
                quarantined.add(q)
        return cls(tuple(sorted(committed)), frozenset(quarantined))

    @property
    def visible(self) -> int | None:
        """The generation ``latest``/``restore`` use: the highest committed one not quarantined."""
        ok = [g for g in self.committed if g not in self.quarantined]
        return ok[-1] if ok else None

    @property
    def next_generation(self) -> int:
        return (self.committed[-1] + 1) if self.committed else 1
