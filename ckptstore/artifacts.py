"""Inference artifacts stored next to a committed step: ``torch.export`` programs and TorchScript modules.

The tutorial's "TorchScript" section — a model you can load and run *without its Python class* — as part of a
checkpoint. A step's manifest is immutable once committed, so an artifact lives beside it with its own small
JSON sidecar::

    step-000000001200/
        manifest.json                    # the commit of the step (unchanged)
        shard-….safetensors
        artifact-serving.pt2             # torch.export.save(...)   (kind "exported_program")
        artifact-serving.json            # {"kind", "file", "size", "crc32c", ...} — written last: its commit
        artifact-scripted.ts             # torch.jit.save(...)      (kind "torchscript")
        artifact-scripted.json

An artifact exists iff its sidecar exists; the sidecar is written after the data file (``create_exclusive``),
so a crash leaves no half-written artifact visible, and an artifact name, like a step, is never overwritten.

**Safety.** Artifacts are loaded only when asked for (:func:`load_artifact`); ``load``/``restore``/``verify``
never touch them beyond checksums. Loading verifies size and crc32c first. ``torch.jit.load`` runs TorchScript
code (a restricted language, not arbitrary Python) and ``torch.export.load`` rebuilds a graph of ATen
operators; neither unpickles arbitrary Python objects, but both execute the model's computation — load
artifacts from sources you trust to run a model.

Entire-model *pickles* (the tutorial's ``torch.save(model)``) are not artifacts: store them in the step with
``mgr.save(step, {"model": Pickled(model)}, allow_pickle=True)``; they load only with ``trusted=True``.

Example::

    ep = torch.export.export(model.eval(), (example_input,))
    mgr.save_artifact(1200, "serving", ep)
    program = mgr.load_artifact(1200, "serving")        # an ExportedProgram; no model class needed
    y = program.module()(example_input)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    ManifestError,
    UnsupportedValueError,
)
from .format.manifest import MANIFEST_NAME, step_dir
from .io import crc32c
from .storage.base import Storage

log = logging.getLogger("ckptstore")

ARTIFACT_FORMAT = "ckptstore-artifact"
ARTIFACT_FORMAT_VERSION = 1
#: kind -> file extension of the data file.
KINDS: dict[str, str] = {"exported_program": ".pt2", "torchscript": ".ts"}
PREFIX = "artifact-"
SIDECAR_SUFFIX = ".json"
MAX_SIDECAR_BYTES = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_CHUNK = 16 << 20


@dataclass(frozen=True)
class ArtifactInfo:
    """What a sidecar says about one artifact.

    Example::

        for a in mgr.artifacts(1200):
            print(a.name, a.kind, a.size)
    """

    step: int
    name: str
    kind: str
    file: str
    size: int
    crc32c: int
    created_at: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "name": self.name,
            "kind": self.kind,
            "file": self.file,
            "size": self.size,
            "crc32c": f"{self.crc32c:08x}",
            "created_at": self.created_at,
            "versions": dict(self.versions),
        }


def check_name(name: object) -> str:
    """Artifact names are 1-128 characters of ``[A-Za-z0-9_.-]`` starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UnsupportedValueError(
            f"invalid artifact name {name!r}: use 1-128 characters of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return name


def sidecar_name(name: str) -> str:
    """``artifact-<name>.json``."""
    return f"{PREFIX}{check_name(name)}{SIDECAR_SUFFIX}"


def data_name(name: str, kind: str) -> str:
    """``artifact-<name>.pt2`` or ``artifact-<name>.ts``."""
    if kind not in KINDS:
        raise ManifestError(f"unknown artifact kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return f"{PREFIX}{check_name(name)}{KINDS[kind]}"


def artifact_kind(obj: Any) -> str:
    """``"exported_program"`` for a ``torch.export.ExportedProgram``, ``"torchscript"`` for a scripted or traced
    module/function; anything else raises ``UnsupportedValueError``."""
    exported = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if exported is not None and isinstance(obj, exported):
        return "exported_program"
    jit = torch.jit
    if isinstance(obj, (jit.ScriptModule, jit.ScriptFunction)):
        return "torchscript"
    raise UnsupportedValueError(
        f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} as an artifact: pass a "
        "torch.export.ExportedProgram (torch.export.export(model, args)) or a TorchScript module "
        "(torch.jit.script(model)); store weights with save() and whole-model pickles with Pickled(...)"
    )


def _require_committed(storage: Storage, step: int) -> None:
    if not storage.exists(f"{step_dir(step)}/{MANIFEST_NAME}"):
        raise CheckpointNotFoundError(
            f"step {step} is not committed under {storage.url}; artifacts attach to committed steps", step=step
        )


def save_artifact(storage: Storage, step: int, name: str, obj: Any) -> ArtifactInfo:
    """Store ``obj`` (ExportedProgram or TorchScript) as artifact ``name`` of committed ``step``.

    The program is serialised to a local temporary file (bounded memory), streamed to the step's prefix with its
    crc32c, then the sidecar is created exclusively — the commit. ``CheckpointExistsError`` if the step already
    has an artifact of that name, ``CheckpointNotFoundError`` if the step is not committed.

    Example::

        save_artifact(mgr.storage, 1200, "scripted", torch.jit.script(model))
    """
    check_name(name)
    kind = artifact_kind(obj)
    _require_committed(storage, step)
    prefix = step_dir(step)
    side_rel = f"{prefix}/{sidecar_name(name)}"
    if storage.exists(side_rel):
        raise CheckpointExistsError(
            f"step {step} already has an artifact named {name!r}; artifacts are immutable — pick another name",
            step=step,
        )
    fname = data_name(name, kind)
    tmpdir = tempfile.mkdtemp(prefix="ckptstore-artifact-")
    try:
        path = os.path.join(tmpdir, fname)
        if kind == "exported_program":
            torch.export.save(obj, path)
        else:
            torch.jit.save(obj, path)
        size, crc = _upload(storage, f"{prefix}/{fname}", path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    info = ArtifactInfo(
        step=step,
        name=name,
        kind=kind,
        file=fname,
        size=size,
        crc32c=crc,
        created_at=time.time(),
        versions={"ckptstore": __version__, "torch": torch.__version__},
    )
    doc = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION, **info.to_dict()}
    storage.sync_dir(prefix)
    try:
        storage.create_exclusive(side_rel, json.dumps(doc, indent=1).encode() + b"\n")
    except FileExistsError:
        raise CheckpointExistsError(
            f"another writer stored artifact {name!r} of step {step} at the same time", step=step
        ) from None
    log.info("stored artifact %r (%s, %d bytes) in step %d", name, kind, size, step)
    return info


def _upload(storage: Storage, rel: str, path: str) -> tuple[int, int]:
    crc = 0
    size = 0
    w = storage.open_write(rel)
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(_CHUNK)  # a fresh buffer per write: writers may keep it until close()
                if not data:
                    break
                crc = crc32c(data, crc)
                size += len(data)
                w.write([memoryview(data)])
        w.close()
    except BaseException:
        try:
            w.abort()
        except Exception as e:
            log.debug("abort of %s failed: %s", rel, e)
        raise
    return size, crc


def _parse_sidecar(data: bytes, step: int, name: str, where: str) -> ArtifactInfo:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
        raise ManifestError(f"{where} is not a ckptstore artifact sidecar")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"{where}: invalid format_version {version!r}")
    if version > ARTIFACT_FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version} is newer than this ckptstore reads; upgrade")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ManifestError(f"{where}: unknown artifact kind {kind!r}")
    if doc.get("name") != name:
        raise ManifestError(f"{where}: sidecar names artifact {doc.get('name')!r}, expected {name!r}")
    fname = data_name(name, kind)
    if doc.get("file") != fname:  # never follow a file name chosen by the sidecar
        raise ManifestError(f"{where}: data file must be {fname!r}, the sidecar says {doc.get('file')!r}")
    size, crc_s = doc.get("size"), doc.get("crc32c")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: size must be a non-negative integer")
    if not isinstance(crc_s, str) or not re.fullmatch(r"[0-9a-f]{8}", crc_s):
        raise ManifestError(f"{where}: crc32c must be 8 hex digits")
    created = doc.get("created_at", 0.0)
    versions = doc.get("versions") or {}
    return ArtifactInfo(
        step=step,
        name=name,
        kind=kind,
        file=fname,
        size=size,
        crc32c=int(crc_s, 16),
        created_at=float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else 0.0,
        versions={str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {},
    )


def artifact_info(storage: Storage, step: int, name: str) -> ArtifactInfo:
    """Read and validate the sidecar of artifact ``name`` (``CheckpointNotFoundError`` if there is none)."""
    rel = f"{step_dir(step)}/{sidecar_name(name)}"
    where = storage.url_of(rel)
    try:
        size = storage.size(rel)
        if size > MAX_SIDECAR_BYTES:
            raise ManifestError(f"{where}: {size} bytes is larger than a sidecar may be")
        data = storage.read_bytes(rel)
    except (FileNotFoundError, EOFError):
        have = [a.name for a in list_artifacts(storage, step)] if storage.exists(step_dir(step)) else []
        raise CheckpointNotFoundError(
            f"step {step} has no artifact named {name!r} under {storage.url} "
            f"(artifacts: {', '.join(have) if have else 'none'})",
            step=step,
        ) from None
    return _parse_sidecar(data, step, name, where)


def list_artifacts(storage: Storage, step: int) -> list[ArtifactInfo]:
    """The committed artifacts of ``step`` (those with a sidecar), by name."""
    out = []
    for fname in storage.list_dir(step_dir(step)):
        if not (fname.startswith(PREFIX) and fname.endswith(SIDECAR_SUFFIX)):
            continue
        name = fname[len(PREFIX) : -len(SIDECAR_SUFFIX)]
        if not _NAME_RE.match(name):
            continue
        out.append(artifact_info(storage, step, name))
    return sorted(out, key=lambda a: a.name)


def verify_artifact(
    storage: Storage,
    info: ArtifactInfo,
    *,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int = _CHUNK,
    into: Any = None,
) -> None:
    """Re-read an artifact's data file and check size and crc32c (``IntegrityError`` naming step/file/name).

    ``into``, if given, is a binary file object that receives the bytes as they are read.
    """
    rel = f"{step_dir(info.step)}/{info.file}"
    key = f"artifact:{info.name}"
    try:
        actual = storage.size(rel)
    except FileNotFoundError:
        raise IntegrityError(
            f"step {info.step}: the data file {info.file} of artifact {info.name!r} is missing",
            step=info.step,
            file=info.file,
            key=key,
        ) from None
    if actual != info.size:
        raise IntegrityError(
            f"step {info.step}: artifact {info.name!r} file {info.file} is {actual} bytes, its sidecar says "
            f"{info.size}",
            step=info.step,
            file=info.file,
            key=key,
        )
    crc = 0
    pos = 0
    while pos < info.size:
        n = min(chunk_bytes, info.size - pos)
        data = storage.read_bytes(rel, pos, pos + n)
        crc = crc32c(data, crc)
        if into is not None:
            into.write(data)
        pos += n
        if progress is not None:
            progress(n)
    if crc != info.crc32c:
        raise IntegrityError(
            f"checksum mismatch in step {info.step}, artifact {info.name!r}, file {info.file} "
            f"(crc32c {crc:08x}, sidecar {info.crc32c:08x})",
            step=info.step,
            file=info.file,
            key=key,
        )


def load_artifact(storage: Storage, step: int, name: str, *, map_location: Any = None) -> Any:
    """Load artifact ``name`` of ``step`` after checking its size and crc32c; no model class is needed.

    Returns a ``torch.export.ExportedProgram`` or a TorchScript module (``map_location`` applies to
    TorchScript only). ``IntegrityError`` if the bytes do not match the sidecar (nothing is deserialised then).

    Example::

        scripted = load_artifact(mgr.storage, 1200, "scripted")
        scripted.eval()
    """
    info = artifact_info(storage, step, name)
    tmpdir = tempfile.mkdtemp(prefix="ckptstore-artifact-")
    try:
        path = os.path.join(tmpdir, info.file)
        with open(path, "wb") as f:
            verify_artifact(storage, info, into=f)
        if info.kind == "exported_program":
            return torch.export.load(path)
        return torch.jit.load(path, map_location=map_location)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


__all__ = [
    "KINDS",
    "ArtifactInfo",
    "artifact_info",
    "artifact_kind",
    "check_name",
    "list_artifacts",
    "load_artifact",
    "save_artifact",
    "sidecar_name",
    "verify_artifact",
]
