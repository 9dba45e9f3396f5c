"""The step manifest: the JSON document whose existence *is* the commit of a step.

Layout (``format_version`` 1)::

    {
      "format": "ckptstore", "format_version": 1,
      "step": 1200, "epoch": 3, "metrics": {"loss": 0.41}, "metadata": {...},
      "created_at": 1764000000.123, "created_at_iso": "2025-...Z",
      "world_size": 2, "save_id": "9f1c2a7b",
      "versions": {"ckptstore": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
      "nbytes": 123456,
      "files": {"shard-9f1c2a7b-r0-0.safetensors": 61740, ...},
      "tensors": {"model/fc1.weight": {"dtype": "float32", "shape": [120, 400], "device": "cpu",
                   "pieces": [{"file": "...", "range": [8, 192008], "crc32c": "1a2b3c4d"}]}, ...},
      "tree": {...},          # the nested state: containers, JSON leaves, references to tensors
      "extras": {...}         # forward-compatible room (artifacts, per-rank info)
    }

A piece without ``offsets``/``shape`` covers its whole tensor; otherwise it is the box
``[offsets[i], offsets[i] + shape[i])`` of the global tensor. ``range`` is an absolute byte range of ``file``.
Non-finite floats (metrics, JSON leaves) are written as ``{"$float": "nan" | "inf" | "-inf"}`` so the file is
strict JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ManifestError, UnsafeCheckpointError, UnsupportedValueError
from .state import check_device, check_tree

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STEP_DIR_RE = re.compile(r"^step-(\d{12,})$")
#: Manifests larger than this are refused before being read (bounded memory on hostile input).
MAX_MANIFEST_BYTES = 1 << 30

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def step_dir(step: int) -> str:
    """The prefix of a step: ``step-000000001200`` (zero-padded so listings also sort lexically)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    m = STEP_DIR_RE.match(name.rstrip("/"))
    return int(m.group(1)) if m else None


def check_file_name(name: object) -> str:
    """A manifest file reference must be a plain name inside the step prefix."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"file reference {name!r} is not a non-empty string")
    if "/" in name or "\\" in name or name in (".", "..") or ":" in name or not _SAFE_NAME.match(name):
        raise UnsafeCheckpointError(
            f"manifest refers to file {name!r}, which is not a plain name inside the step prefix; refusing to read it"
        )
    return name


def dtype_from_name(name: object) -> torch.dtype:
    if not isinstance(name, str) or not name.isidentifier():
        raise ManifestError(f"invalid dtype {name!r}")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ManifestError(f"unknown dtype {name!r}")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# -- JSON values with non-finite floats ----------------------------------------------------------------------
def encode_json(value: Any, where: str = "value") -> Any:
    """Turn a JSON-like Python value into strict-JSON data (non-finite floats tagged)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsupportedValueError(f"{where}: keys must be strings, got {k!r}")
            out[k] = encode_json(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return encode_json(value.item(), where)
    raise UnsupportedValueError(f"{where}: {type(value).__name__} is not JSON-serialisable (use str/int/float/...)")


def decode_json(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and "$float" in value:
            if value["$float"] not in ("nan", "inf", "-inf"):
                raise ManifestError(f"invalid tagged float {value['$float']!r}")
            return float(value["$float"])
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


def _reject_constant(c: str) -> Any:
    raise ManifestError(f"manifest contains the non-JSON constant {c}")


# -- data classes ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    file: str
    start: int
    end: int
    crc32c: int
    offsets: tuple[int, ...] | None = None  # None: the piece is the whole tensor
    shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "range": [self.start, self.end], "crc32c": f"{self.crc32c:08x}"}
        if self.offsets is not None:
            d["offsets"] = list(self.offsets)
            d["shape"] = list(self.shape or ())
        return d


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    device: str = "cpu"
    encoding: str = "raw"  # "raw" tensor bytes, or "pickle" (bytes of a pickled object; trusted loads only)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "device": self.device}
        if self.encoding != "raw":
            d["encoding"] = self.encoding
        d["pieces"] = [p.to_json() for p in self.pieces]
        return d


@dataclass
class Manifest:
    step: int
    tree: Any
    tensors: dict[str, TensorEntry]
    files: dict[str, int]
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    world_size: int = 1
    save_id: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def has_pickles(self) -> bool:
        return any(t.encoding == "pickle" for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        import datetime as dt

        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": encode_json(self.metrics, "metrics"),
            "metadata": encode_json(self.metadata, "metadata"),
            "created_at": self.created_at,
            "created_at_iso": dt.datetime.fromtimestamp(self.created_at, tz=dt.timezone.utc).isoformat(),
            "world_size": self.world_size,
            "save_id": self.save_id,
            "versions": self.versions,
            "nbytes": self.nbytes,
            "files": dict(self.files),
            "tensors": None,  # written row by row below
            "tree": self.tree,
            "extras": self.extras,
        }
        # One field per line and one tensor per line: compact for 10k-tensor states, still readable and diffable.
        enc = _ENCODER.encode
        lines = []
        for k, v in doc.items():
            if k == "tensors":
                memo: dict[str, str] = {}  # dtype, device and file names repeat across thousands of rows
                rows = [f"  {_json_str(tk)}:{_tensor_json(te, memo)}" for tk, te in self.tensors.items()]
                lines.append(' "tensors":{\n' + ",\n".join(rows) + "\n }" if rows else ' "tensors":{}')
            else:
                lines.append(f" {enc(k)}:{enc(v)}")
        body = ("{\n" + ",\n".join(lines)).encode()
        # The manifest checksums itself: its last field is the crc32c of every byte before it, so a bit flip
        # that still parses as a valid manifest (1000 -> 1001, a renamed key) is caught too.
        return body + _CRC_FIELD + f'{_crc32c(body):08x}"\n}}\n'.encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "manifest") -> Manifest:
        """Parse and validate; every structural problem is a ``ManifestError``, unsafe paths are refused."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where}: {len(data)} bytes is larger than the {MAX_MANIFEST_BYTES} allowed")
        try:
            doc = json.loads(data, parse_constant=_reject_constant)
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ManifestError(f"{where} is not valid JSON ({e}); the step is damaged or not committed") from None
        m = _from_doc(doc, where)
        # Checked after the structural validation, so hostile input still gets its specific error.
        _check_self_crc(data, doc, where)
        return m


# One encoder for every line: json.dumps with options builds a new JSONEncoder per call (10k tensors = 20k).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=True)
_PLAIN = re.compile(r"[\x20-\x7e]*")


def _json_str(v: str) -> str:
    # Printable ASCII without quote or backslash is its own JSON encoding; anything else goes to the encoder.
    if _PLAIN.fullmatch(v) and '"' not in v and "\\" not in v:
        return f'"{v}"'
    return _ENCODER.encode(v)


def _ints(v: tuple[int, ...]) -> str:
    return "[" + ",".join(str(int(x)) for x in v) + "]"


def _tensor_json(t: TensorEntry, memo: dict[str, str] | None = None) -> str:
    """Exactly ``_ENCODER.encode(t.to_json())``, without building the dicts (10k-tensor states save faster)."""
    memo = {} if memo is None else memo

    def js(v: str) -> str:
        out = memo.get(v)
        if out is None:
            out = memo[v] = _json_str(v)
        return out

    pieces = []
    for p in t.pieces:
        box = "" if p.offsets is None else f',"offsets":{_ints(p.offsets)},"shape":{_ints(p.shape or ())}'
        pieces.append(f'{{"file":{js(p.file)},"range":[{int(p.start)},{int(p.end)}],"crc32c":"{p.crc32c:08x}"{box}}}')
    enc = "" if t.encoding == "raw" else f',"encoding":{js(t.encoding)}'
    return (
        f'{{"dtype":{js(t.dtype)},"shape":{_ints(t.shape)},"device":{js(t.device)}{enc},"pieces":[{",".join(pieces)}]}}'
    )


_CRC_FIELD = b',\n "manifest_crc32c":"'


def _crc32c(data: bytes) -> int:
    import crc32c

    return int(crc32c.crc32c(data))


def _check_self_crc(data: bytes, doc: dict[str, Any], where: str) -> None:
    idx = data.rfind(_CRC_FIELD)
    want = doc.get("manifest_crc32c")
    if idx < 0 or not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{8}", want):
        raise ManifestError(f"{where}: missing or malformed manifest_crc32c; the manifest is damaged")
    if data[idx + len(_CRC_FIELD) :] != f'{want}"\n}}\n'.encode():
        raise ManifestError(f"{where}: manifest_crc32c is not the last field; the manifest is damaged")
    got = _crc32c(data[:idx])
    if got != int(want, 16):
        raise ManifestError(
            f"{where}: manifest checksum mismatch (crc32c {got:08x}, recorded {want}); the manifest is damaged"
        )


def _req(doc: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ManifestError(f"{where}: missing field {key!r}")
    v = doc[key]
    if not isinstance(v, types) or (
        isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    ):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _int_list(v: Any, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ManifestError(f"{where}: {what} must be a list of non-negative integers, got {v!r}")
    return tuple(v)


#: Largest element count a stored tensor may declare (also stops shape-overflow tricks: without a bound, a
#: hostile shape of 100k huge dimensions makes the product take minutes of CPU).
MAX_NUMEL = 1 << 62


def _numel(shape: tuple[int, ...]) -> int:
    if 0 in shape:
        return 0
    n = 1
    for s in shape:
        n *= s
        if n > MAX_NUMEL:
            raise ManifestError(f"shape with {len(shape)} dimensions has more than 2**62 elements")
    return n


def _from_doc(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: top level must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not a ckptstore manifest (format={doc.get('format')!r})")
    version = _req(doc, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {version} was written by a newer ckptstore (this one reads up to "
            f"{FORMAT_VERSION}); upgrade ckptstore to read it"
        )
    if version < 1:
        raise ManifestError(f"{where}: invalid format_version {version}")
    step = _req(doc, "step", int, where)
    files_doc = _req(doc, "files", dict, where)
    files: dict[str, int] = {}
    for name, size in files_doc.items():
        check_file_name(name)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: size of file {name!r} must be a non-negative integer")
        files[name] = size
    tensors: dict[str, TensorEntry] = {}
    for key, t in _req(doc, "tensors", dict, where).items():
        w = f"{where}: tensor {key!r}"
        if not isinstance(t, dict):
            raise ManifestError(f"{w} is not an object")
        dtype = t.get("dtype")
        dt = dtype_from_name(dtype)
        shape = _int_list(t.get("shape"), "shape", w)
        try:
            numel = _numel(shape)  # bounded: a box inside the shape has at most as many elements
        except ManifestError as e:
            raise ManifestError(f"{w}: {e}") from None
        encoding = t.get("encoding", "raw")
        if encoding not in ("raw", "pickle"):
            raise ManifestError(f"{w}: unknown encoding {encoding!r}")
        pieces_doc = t.get("pieces")
        if not isinstance(pieces_doc, list):
            raise ManifestError(f"{w}: pieces must be a list")
        pieces = []
        covered = 0
        for p in pieces_doc:
            if not isinstance(p, dict):
                raise ManifestError(f"{w}: piece is not an object")
            fname = check_file_name(p.get("file"))
            if fname not in files:
                raise ManifestError(f"{w}: piece refers to file {fname!r} that the manifest does not list")
            rng = _int_list(p.get("range"), "range", w)
            if len(rng) != 2 or rng[0] > rng[1] or rng[1] > files[fname]:
                raise ManifestError(f"{w}: byte range {list(rng)} lies outside file {fname!r} ({files[fname]} B)")
            crc_s = p.get("crc32c")
            if not isinstance(crc_s, str) or not re.fullmatch(r"[0-9a-f]{8}", crc_s):
                raise ManifestError(f"{w}: crc32c must be 8 hex digits")
            offs = shp = None
            if "offsets" in p or "shape" in p:
                offs = _int_list(p.get("offsets"), "piece offsets", w)
                shp = _int_list(p.get("shape"), "piece shape", w)
                if len(offs) != len(shape) or len(shp) != len(shape):
                    raise ManifestError(f"{w}: piece box rank does not match the tensor's")
                if any(o + s > g for o, s, g in zip(offs, shp, shape)):
                    raise ManifestError(f"{w}: piece box {list(offs)}+{list(shp)} exceeds shape {list(shape)}")
            box_numel = _numel(shp) if shp is not None else numel
            if encoding == "raw" and box_numel * dt.itemsize != rng[1] - rng[0]:
                raise ManifestError(f"{w}: piece byte range does not match its shape and dtype")
            covered += box_numel
            pieces.append(Piece(fname, rng[0], rng[1], int(crc_s, 16), offs, shp))
        if encoding == "raw" and pieces and covered < numel:
            raise ManifestError(f"{w}: pieces cover {covered} of {numel} elements")
        device = t.get("device", "cpu")
        check_device(device, w)
        tensors[key] = TensorEntry(dtype_name(dt), shape, tuple(pieces), device, encoding)
    epoch = doc.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        raise ManifestError(f"{where}: epoch must be an integer or null")
    metrics = doc.get("metrics") or {}
    metadata = doc.get("metadata") or {}
    if not isinstance(metrics, dict) or not isinstance(metadata, dict):
        raise ManifestError(f"{where}: metrics and metadata must be objects")
    created_at = doc.get("created_at", 0.0)
    if not isinstance(created_at, (int, float)) or isinstance(created_at, bool):
        raise ManifestError(f"{where}: created_at must be a number")
    world_size = doc.get("world_size", 1)
    if not isinstance(world_size, int) or world_size < 1:
        raise ManifestError(f"{where}: world_size must be a positive integer")
    versions = doc.get("versions") or {}
    extras = doc.get("extras") or {}
    if not isinstance(versions, dict) or not isinstance(extras, dict):
        raise ManifestError(f"{where}: versions and extras must be objects")
    if "tree" not in doc:
        raise ManifestError(f"{where}: missing field 'tree'")
    check_tree(doc["tree"], tensors, where)
    return Manifest(
        step=step,
        tree=doc["tree"],
        tensors=tensors,
        files=files,
        epoch=epoch,
        metrics=decode_json(metrics),
        metadata=decode_json(metadata),
        created_at=float(created_at),
        world_size=world_size,
        save_id=str(doc.get("save_id", "")),
        versions={str(k): str(v) for k, v in versions.items()},
        extras=extras,
        format_version=version,
    )
