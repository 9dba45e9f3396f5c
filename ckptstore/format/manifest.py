"""The step manifest: the JSON document whose existence *is* the commit of a step.

Layout (``format_version`` 1), one field per line and one tensor per line, exactly as :meth:`Manifest.to_bytes`
writes it::

    {
     "format":"ckptstore",
     "format_version":1,
     "step":1200, "epoch":3, "metrics":{"loss":0.41}, "metadata":{...},      (each on its own line)
     "created_at":1764000000.123, "created_at_iso":"2025-...Z",
     "world_size":2, "save_id":"9f1c2a7b",
     "versions":{"ckptstore":"0.1.0","torch":"2.13.0","python":"3.11.7"},
     "nbytes":123456,
     "files":{"shard-9f1c2a7b-r0-0.safetensors":61740,...},
     "tensors":{
      "model/fc1.weight":{"dtype":"float32","shape":[120,400],"device":"cpu",
                          "pieces":[{"file":"...","range":[8,192008],"crc32c":"1a2b3c4d"}]},   (one line)
      ...
     },
     "tree":{...},          # the nested state: containers, JSON leaves, references to tensors
     "extras":{...},        # forward-compatible room (artifacts, per-rank info)
     "manifest_crc32c":"0badf00d"
    }

A piece without ``offsets``/``shape`` covers its whole tensor; otherwise it is the box
``[offsets[i], offsets[i] + shape[i])`` of the global tensor. ``range`` is an absolute byte range of ``file``.
Non-finite floats (metrics, JSON leaves) are written as ``{"$float": "nan" | "inf" | "-inf"}`` so the file is
strict JSON.

Reading treats the bytes as hostile, in this order: the size cap (:data:`MAX_MANIFEST_BYTES`), then integrity
(the trailing ``manifest_crc32c``, the crc32c of every byte before it), then structure and safety. Every tensor
row is checked: dtype in :data:`~ckptstore.format.state.STORABLE_DTYPE_NAMES`, every piece's byte range exactly
``elements of its box * itemsize`` bytes inside a listed file, the boxes disjoint and covering the tensor's shape
exactly. Rows are parsed one at a time into compact tuples (interned names and shapes), never into a dict tree of
the whole manifest, and the JSON the rest holds is costed before it is parsed, so the parse needs a bounded
multiple of the manifest's size (see :data:`MAX_MANIFEST_BYTES`).
"""

from __future__ import annotations

import binascii
import bisect
import itertools
import json
import logging
import math
import operator
import re
import struct
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from json.decoder import scanstring as _scanstring
from typing import Any, NamedTuple

import torch

from .._gcpause import gc_pause
from ..errors import ManifestError, UnsafeCheckpointError, UnsupportedValueError
from .crc import crc32c as _crc32c
from .crc import crc32c_groups
from .state import STORABLE_DTYPES, check_device, check_tree

log = logging.getLogger(__name__)

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 2
#: Versions this reader reads (1: every piece explicit; 2: also compact rows of evenly split tensors).
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
#: Manifests larger than this are refused, by writers and readers alike (before a byte is parsed). Parsing costs
#: (peak RSS over the bytes read, ``benchmarks/manifest_parse.py``): a realistic manifest ~2.5x its size (a
#: 249 MiB one, 464k tensors / 1.3M pieces: +616 MiB); the worst hostile shapes the limits let through ~3x (rows
#: or pieces as small as they get) and ~5.5x (JSON filled up to the budget below). 256 MiB is ~470k tensors.
#: Format 2 with grouped checksums drops most per-part bytes but not the rows, files and tree, which cost ~6.5x
#: their own bytes (``tests/unit/test_scale_format.py``: 1.7-2.2x less memory than with a crc32c per part).
MAX_MANIFEST_BYTES = 256 << 20
#: The JSON outside the tensor rows (tree, metadata, metrics, extras, ...) may cost at most
#: ``JSON_BUDGET_RATIO * manifest size + JSON_BUDGET_BYTES`` bytes of Python objects, as estimated by
#: :func:`json_cost` before it is parsed. Writers refuse to commit a manifest over it (:func:`check_limits`). A real
#: model + AdamW + scheduler state is charged ~4.4x its manifest's size (its tree: small dicts, lists of ints),
#: the benchmark's state ~1.6x; the 64 MiB floor covers every manifest up to ~10 MiB whatever its shape.
JSON_BUDGET_RATIO = 6
JSON_BUDGET_BYTES = 64 << 20
#: Steps are 0 .. 2**63-1 (a step directory name has 12 to 19 digits).
MAX_STEP = (1 << 63) - 1
#: Largest file size, byte offset, epoch magnitude a manifest may state.
MAX_INT64 = (1 << 63) - 1
#: Largest ``created_at`` (9999-12-31T23:59:59Z, the last second ``datetime`` can represent).
MAX_CREATED_AT = 253402300799.0
MAX_WORLD_SIZE = (1 << 31) - 1
#: Largest element count a stored tensor may declare, and largest size of one dimension (also stops
#: shape-overflow tricks: without a bound, a hostile shape of 100k huge dimensions makes the product take minutes).
MAX_NUMEL = 1 << 62
#: Format 2 layout lines checksum groups of consecutive parts of a file (one crc32c per group of ``k`` parts, not
#: per part): the writer picks ``k`` per file so that a group holds at most this many bytes, which is what
#: reading one part may cost on top of its own bytes (the whole group is read to check it).
GROUP_BYTES = 1 << 20
#: Largest group size ``k`` a layout line may state (writers and readers): a checksum covers at most this many
#: parts, so a manifest's parts stay bounded by its size (``MAX_GROUP_PARTS`` per 5.33 bytes of base64).
MAX_GROUP_PARTS = 4096

#: The canonical step directory name: ``step-`` and 12 to 19 ASCII digits (see :func:`parse_step_dir`).
STEP_DIR_RE = re.compile(r"step-([0-9]{12,19})")

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def step_dir(step: int) -> str:
    """The prefix of a step: ``step-000000001200`` (zero-padded so listings also sort lexically)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"step-{step:012d}"


def parse_step_dir(name: object) -> int | None:
    """The step of a step directory name, or None when ``name`` is not exactly what :func:`step_dir` builds.

    Only the canonical spelling counts (ASCII digits, 12 digits of zero padding, no extra leading zero, no
    trailing ``/``): ``step-0000000000005`` or ``step-`` followed by Arabic-Indic digits would otherwise be listed
    as step 5 and then looked up under ``step-000000000005``, another name.
    """
    if not isinstance(name, str):
        return None
    m = STEP_DIR_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step <= MAX_STEP and step_dir(step) == name else None


def check_file_name(name: object) -> str:
    """A manifest file reference must be a plain name inside the step prefix."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"file reference {name!r} is not a non-empty string")
    if "/" in name or "\\" in name or name in (".", "..") or ":" in name or not _SAFE_NAME.fullmatch(name):
        raise UnsafeCheckpointError(
            f"manifest refers to file {name!r}, which is not a plain name inside the step prefix; refusing to read it"
        )
    return name


def dtype_from_name(name: object) -> torch.dtype:
    """A ``torch.dtype`` named in the state tree (a JSON value, not tensor data): any dtype torch knows."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ManifestError(f"invalid dtype {name!r}")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ManifestError(f"unknown dtype {name!r}")
    return dt


def tensor_dtype(name: object, where: str = "manifest") -> torch.dtype:
    """The dtype of stored tensor data: only :data:`~ckptstore.format.state.STORABLE_DTYPES`, canonical names."""
    dt = STORABLE_DTYPES.get(name) if isinstance(name, str) else None
    if dt is None:
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            raise ManifestError(
                f"{where}: dtype {name!r} is not one ckptstore stores (quantized and packed dtypes are refused, and "
                "dtypes are spelled as str(dtype) without 'torch.'); the manifest is hostile or damaged"
            )
        raise ManifestError(f"{where}: unknown dtype {name!r}")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    """The canonical name stored for tensors of ``dt``; ``UnsupportedValueError`` for dtypes ckptstore refuses."""
    name = str(dt).removeprefix("torch.")
    if STORABLE_DTYPES.get(name) is not dt:
        raise UnsupportedValueError(
            f"tensors of dtype {dt} cannot be stored (quantized and packed dtypes are refused); convert them, e.g. "
            "t.int_repr() / t.dequantize(), or store them with allow_pickle=True"
        )
    return name


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
    """Undo :func:`encode_json`: tagged non-finite floats back to floats. Works in place on the containers of
    ``value`` (parsed JSON, owned by the caller), so decoding a huge metadata tree never copies it."""
    if isinstance(value, dict):
        if len(value) == 1 and "$float" in value:
            return _tagged_float(value["$float"])
        stack: list[Any] = [value]
    elif isinstance(value, list):
        stack = [value]
    else:
        return value
    while stack:  # iterative: no recursion limit on deep (already depth-checked by json) trees
        node = stack.pop()
        # Replacing the value of an existing key (or list slot) while iterating is safe: the size never changes.
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(v, dict):
                if len(v) == 1 and "$float" in v:
                    node[k] = _tagged_float(v["$float"])
                else:
                    stack.append(v)
            elif isinstance(v, list):
                stack.append(v)
    return value


def _tagged_float(tag: Any) -> float:
    if not isinstance(tag, str) or tag not in ("nan", "inf", "-inf"):
        raise ManifestError(f"invalid tagged float {tag!r:.100}")
    return float(tag)


def _reject_constant(c: str) -> Any:
    raise ManifestError(f"manifest contains the non-JSON constant {c}")


# -- data classes ----------------------------------------------------------------------------------------------
# Tuples, not dataclasses: a manifest of a million tensors holds millions of pieces, and a tuple is both the
# smallest object with named fields (no per-instance dict) and the fastest to build while parsing.
class Piece(NamedTuple):
    """Bytes ``[start, end)`` of ``file`` holding a tensor (``offsets`` None) or the box ``offsets`` + ``shape``
    of it. ``crc32c`` is the checksum of the bytes ``span`` of ``file``: the piece's own bytes when ``span`` is
    None, else a group of neighbouring parts that contains it (format 2 layout lines with a group size, see
    :class:`SplitPieces`) — checking such a piece means reading the whole span."""

    file: str
    start: int
    end: int
    crc32c: int
    offsets: tuple[int, ...] | None = None  # None: the piece is the whole tensor
    shape: tuple[int, ...] | None = None
    span: tuple[int, int] | None = None  # (start, end) of the bytes crc32c covers; None: [start, end)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def checked(self) -> tuple[int, int]:
        """``(start, end)`` of the bytes ``crc32c`` covers."""
        return (self.start, self.end) if self.span is None else self.span

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "range": [self.start, self.end], "crc32c": f"{self.crc32c:08x}"}
        if self.span is not None:
            d["crc32c_span"] = list(self.span)
        if self.offsets is not None:
            d["offsets"] = list(self.offsets)
            d["shape"] = list(self.shape or ())
        return d


class TensorEntry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    device: str = "cpu"
    encoding: str = "raw"  # "raw" tensor bytes, or "pickle" (bytes of a pickled object; trusted loads only)

    @property
    def torch_dtype(self) -> torch.dtype:
        return tensor_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        pieces = self.pieces
        if isinstance(pieces, SplitPieces):
            return pieces.nbytes
        return sum(p.end - p.start for p in pieces)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "device": self.device}
        if self.encoding != "raw":
            d["encoding"] = self.encoding
        d["pieces"] = [p.to_json() for p in self.pieces]
        return d


_new_piece = tuple.__new__
_new_entry = tuple.__new__


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
        """The manifest's bytes. Refuses (typed errors) to encode what a reader would refuse: see
        :func:`check_limits` — a step, epoch or time out of range or a tensor dtype ckptstore does not store
        (``UnsupportedValueError``), a manifest over :data:`MAX_MANIFEST_BYTES` or the JSON budget
        (``ManifestError``), rows the reader refuses (:func:`_check_entries`: pieces outside their files, boxes that
        overlap or leave a gap, ...; ``ManifestError``)."""
        with gc_pause():
            return self._to_bytes()

    def _to_bytes(self) -> bytes:
        import datetime as dt

        _check_encodable(self)
        compact: dict[str, int] = {}
        layout: list[str] = []
        if self.format_version >= 2:
            compact, layout = _compact_layout(self)  # its rows and files checked with the reader's layout index
        _check_entries(self, compact)
        check_tree(self.tree, self.tensors, f"the manifest of step {self.step}")
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
            "nbytes": sum(  # a compact row holds exactly its elements' bytes (checked by _as_split)
                math.prod(te.shape) * STORABLE_DTYPES[te.dtype].itemsize if tk in compact else te.nbytes
                for tk, te in self.tensors.items()
            ),
            "files": dict(self.files),
            "tensors": None,  # written row by row below
            "layout": None,  # format 2: where the parts of compact rows are, one file per line
            "tree": self.tree,
            "extras": self.extras,
        }
        # One field per line and one tensor per line: compact for 10k-tensor states, still readable and diffable.
        enc = _ENCODER.encode
        lines = []
        cost = 0  # what the reader's JSON budget will charge for the lines that are not tensor rows
        for k, v in doc.items():
            if k == "tensors":
                memo: dict[str, str] = {}  # dtype, device and file names repeat across thousands of rows
                rows = [
                    f"  {_json_str(tk)}:"
                    + (_tensor_json(te, memo) if tk not in compact else _compact_json(te, compact[tk], memo))
                    for tk, te in self.tensors.items()
                ]
                lines.append(' "tensors":{\n' + ",\n".join(rows) + "\n }" if rows else ' "tensors":{}')
            elif k == "layout":
                if layout:
                    lines.append(' "layout":{\n' + ",\n".join(layout) + "\n }")
            else:
                try:
                    value = enc(v)
                except (ValueError, TypeError, RecursionError) as e:
                    raise UnsupportedValueError(f"manifest field {k!r} cannot be encoded as JSON: {e}") from None
                cost += json_cost(value)
                lines.append(f" {enc(k)}:{value}")
        body = ("{\n" + ",\n".join(lines)).encode()
        # The manifest checksums itself: its last field is the crc32c of every byte before it, so a bit flip
        # that still parses as a valid manifest (1000 -> 1001, a renamed key) is caught too.
        data = body + _CRC_FIELD + f'{_crc32c(body):08x}"\n}}\n'.encode()
        check_limits(len(data), cost, where=f"the manifest of step {self.step}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "manifest") -> Manifest:
        """Parse and validate; every structural problem is a ``ManifestError``, unsafe paths are refused
        (``UnsafeCheckpointError``). Integrity (the trailing ``manifest_crc32c``) is checked first: a damaged
        manifest is always a ``ManifestError``, never mistaken for a hostile one."""
        if not isinstance(data, bytes):
            data = bytes(data)
        check_limits(len(data), where=where)
        try:
            body_end = _check_self_crc(data, where)
            with gc_pause():
                return _Reader(data, body_end, where).read()
        except MemoryError:
            raise ManifestError(
                f"{where}: out of memory parsing a {len(data)}-byte manifest; free memory or raise the limits"
            ) from None
        except RecursionError:
            raise ManifestError(f"{where}: JSON nested too deeply; the manifest is damaged or hostile") from None


def _json_budget(size: int) -> int:
    return JSON_BUDGET_RATIO * size + JSON_BUDGET_BYTES


def check_limits(size: int, json_cost_bytes: int = 0, *, where: str = "manifest") -> None:
    """The limits readers apply, for writers too: ``ManifestError`` when a manifest of ``size`` bytes, whose
    JSON outside the tensor rows costs ``json_cost_bytes`` (:func:`json_cost`), would be refused."""
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{where}: {size} bytes is larger than the {MAX_MANIFEST_BYTES} bytes a manifest may have "
            "(ckptstore.format.manifest.MAX_MANIFEST_BYTES); store fewer, larger tensors or less metadata"
        )
    if json_cost_bytes > _json_budget(size):
        raise ManifestError(
            f"{where}: its JSON values (state tree, metadata, metrics, extras) would need about {json_cost_bytes} "
            f"bytes of memory to parse, more than the {_json_budget(size)} allowed for a {size}-byte manifest; "
            "keep big lists of small values out of the state tree and metadata (store them as tensors)"
        )


def json_cost(s: str | bytes, start: int = 0, end: int | None = None, *, ascii: bool | None = None) -> int:
    """An upper bound of the memory (bytes) ``json.loads`` needs for the JSON text ``s[start:end]`` (its objects
    plus the decoded text), from a count of its structural characters, without parsing it. Costs charged (CPython
    3.11, 64-bit, measured): a dict 96 + 96 per entry, a list 64, 16 per element slot, 64 per string header, 32
    per number, and the text twice (the decoded line and the strings' characters): 4x with ``\\u`` escapes
    (2 bytes per character), 10x with non-ASCII bytes or escaped surrogate pairs (4 bytes per character).
    ``ascii``: whether the whole of ``s`` is known to be ASCII (else it is checked).

    Measured against ``tracemalloc``: a realistic state tree (``benchmarks/manifest_parse.py``) is charged ~9x its
    bytes (it takes 5.5x), a list of ``[]`` ~45x (takes 23x), a dict of distinct keys ~20x (10x), 1-key dicts
    ~20x (17.5x), lists of ints 6-26x (5x): never less than the real cost."""
    if end is None:
        end = len(s)
    if isinstance(s, str):
        lb, lk, cm, qt, cl, esc = "{", "[", ",", '"', ":", "\\u"
    else:
        lb, lk, cm, qt, cl, esc = b"{", b"[", b",", b'"', b":", b"\\u"
    if ascii is None:
        ascii = (s if start == 0 and end == len(s) else s[start:end]).isascii()
    factor = 1
    if not ascii:
        factor = 5  # a str may take 4 bytes per character
    elif s.count(esc, start, end):  # type: ignore[arg-type]
        # \\uXXXX escapes: 2 bytes per character, 4 with a surrogate pair (a character past U+FFFF)
        pairs = [b"\\u" + h for h in (b"d8", b"d9", b"da", b"db", b"D8", b"D9", b"DA", b"DB")]
        if isinstance(s, str):
            pairs = [p.decode() for p in pairs]  # type: ignore[misc]
        factor = 5 if any(s.count(p, start, end) for p in pairs) else 2  # type: ignore[arg-type]
    objs, lists = s.count(lb, start, end), s.count(lk, start, end)  # type: ignore[arg-type]
    commas, colons = s.count(cm, start, end), s.count(cl, start, end)  # type: ignore[arg-type]
    strings = s.count(qt, start, end) // 2  # type: ignore[arg-type]
    items = commas + objs + lists + 1  # every value or entry is preceded by "," or opens its container
    numbers = max(commas + 1 + colons - strings, 0)  # items that are neither strings nor keys (an upper bound)
    text = 2 * factor * (end - start)
    return text + 120 * objs + 64 * (colons + lists + strings) + 16 * items + 32 * numbers


def _check_encodable(m: Manifest) -> None:
    """Writer side: the header values a reader refuses."""

    def bad_int(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi

    if bad_int(m.step, 0, MAX_STEP):
        raise UnsupportedValueError(f"step must be an int in 0..{MAX_STEP}, got {m.step!r}")
    if m.epoch is not None and bad_int(m.epoch, -MAX_INT64, MAX_INT64):
        raise UnsupportedValueError(f"epoch must be None or an int in -2**63+1..2**63-1, got {m.epoch!r}")
    if bad_int(m.world_size, 1, MAX_WORLD_SIZE):
        raise UnsupportedValueError(f"world_size must be an int in 1..{MAX_WORLD_SIZE}, got {m.world_size!r}")
    c = m.created_at
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= MAX_CREATED_AT:
        raise UnsupportedValueError(f"created_at must be a Unix time between 0 and {MAX_CREATED_AT:.0f}, got {c!r}")
    for dtype, encoding in {(t.dtype, t.encoding) for t in m.tensors.values()}:
        if dtype not in STORABLE_DTYPES:
            raise UnsupportedValueError(
                f"tensors of dtype {dtype!r} cannot be stored (quantized and packed dtypes are refused); convert them, "
                "e.g. t.int_repr() / t.dequantize(), or store them with allow_pickle=True"
            )
        if encoding not in ("raw", "pickle") or (encoding == "pickle" and dtype != "uint8"):
            raise UnsupportedValueError(f"invalid tensor encoding {encoding!r} for dtype {dtype!r}")


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
        if p.span is not None:
            raise ManifestError(
                f"piece [{p.start}, {p.end}] of {p.file!r} has a checksum of a group of parts (bytes {p.span[0]}-"
                f"{p.span[1]}, read from a format 2 layout), which only a layout line can state; keep the tensor in "
                "the layout it was read from (or give every piece its own crc32c)"
            )
        box = "" if p.offsets is None else f',"offsets":{_ints(p.offsets)},"shape":{_ints(p.shape or ())}'
        pieces.append(f'{{"file":{js(p.file)},"range":[{int(p.start)},{int(p.end)}],"crc32c":"{p.crc32c:08x}"{box}}}')
    enc = "" if t.encoding == "raw" else f',"encoding":{js(t.encoding)}'
    return (
        f'{{"dtype":{js(t.dtype)},"shape":{_ints(t.shape)},"device":{js(t.device)}{enc},"pieces":[{",".join(pieces)}]}}'
    )


_CRC_FIELD = b',\n "manifest_crc32c":"'
_CRC_TAIL = b'"\n}\n'
_HEX8 = re.compile(rb"[0-9a-f]{8}")


def _check_self_crc(data: bytes, where: str) -> int:
    """Integrity first: the manifest ends with ``,\\n "manifest_crc32c":"<8 hex>"\\n}\\n``, the crc32c of every
    byte before that field. Returns where that field starts (the end of the checksummed body)."""
    n = len(data)
    body_end = n - len(_CRC_FIELD) - 8 - len(_CRC_TAIL)
    if (
        body_end < 0
        or not data.endswith(_CRC_TAIL)
        or not data.startswith(_CRC_FIELD, body_end)
        or not _HEX8.fullmatch(data, body_end + len(_CRC_FIELD), n - len(_CRC_TAIL))
    ):
        raise ManifestError(
            f"{where}: missing or malformed manifest_crc32c (it must be the last field); the manifest is damaged, "
            "truncated or not written by ckptstore"
        )
    want = data[n - len(_CRC_TAIL) - 8 : n - len(_CRC_TAIL)].decode()
    got = _crc32c(memoryview(data)[:body_end])
    if got != int(want, 16):
        raise ManifestError(
            f"{where}: manifest checksum mismatch (crc32c {got:08x}, recorded {want}); the manifest is damaged"
        )
    return body_end


# -- the reader --------------------------------------------------------------------------------------------------
# A tensor row exactly as ``_tensor_json`` writes it; anything else goes through ``json`` (``_Reader._row_json``),
# which accepts every equivalent JSON spelling and gives the precise error. Strings: JSON strings without raw
# control characters; integers: JSON integers of at most 19 digits (nothing larger fits a shape or an offset).
_S = r'"((?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+)"'
_N = r"(0|[1-9][0-9]{0,18})"
_L = r"\[((?:0|[1-9][0-9]{0,18})(?:,(?:0|[1-9][0-9]{0,18}))*+)?\]"
_ROW_RE = re.compile(
    r"  "
    + _S
    + r':\{"dtype":'
    + _S
    + r',"shape":'
    + _L
    + r',"device":'
    + _S
    + r'(?:,"encoding":'
    + _S
    + r')?,"pieces":\['
)
_PIECE_RE = re.compile(
    r'\{"file":' + _S + r',"range":\[' + _N + "," + _N + r'\],"crc32c":"([0-9a-f]{8})"'
    r'(?:,"offsets":' + _L + r',"shape":' + _L + r")?\}"
)
_CROW_RE = re.compile(
    r"  " + _S + r':\{"dtype":' + _S + r',"shape":' + _L + r',"device":' + _S + r',"chunk":' + _N + r"\}(,?)"
)
_LAYOUT_RE = re.compile(
    r"  " + _S + r":\[" + _N + "," + _N + "," + _N + "," + _N + r',"([A-Za-z0-9+/]*={0,2})"(?:,' + _N + r")?\](,?)"
)
_FIELD_RE = re.compile(rb' "([A-Za-z0-9_]+)":')
_WS = re.compile(r"[ \t\n\r]*")
_HEX8_S = re.compile(r"[0-9a-f]{8}")
_NO_K = object()  # a layout line without a group size: one checksum per part
_LayoutEntry = tuple[str, int, int, int, int, bytes, int]  # file, part, first row, end row, start, crcs, k


def _unescape(raw: str) -> str:
    return _scanstring(raw + '"', 0)[0] if "\\" in raw else raw


def _int(v: Any, lo: int, hi: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and lo <= v <= hi


class _Reader:
    """One parse: interning tables, the JSON budget, the tensor table being built."""

    def __init__(self, data: bytes, body_end: int, where: str) -> None:
        self.data = data
        self.end = body_end
        self.where = where
        self.budget = _json_budget(len(data))
        self.json_used = 0
        self.ascii = data.isascii()  # what ckptstore writes
        self.decoder = json.JSONDecoder(parse_constant=_reject_constant)
        self.tensors: dict[str, TensorEntry] = {}
        self.files: dict[str, int] | None = None
        self.unchecked: list[str] = []  # tensors read before "files": their pieces are checked at the end
        # Interning: names, dtypes, devices and shapes repeat across thousands of rows.
        self.raw_names: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.raw_ints: dict[str | None, tuple[tuple[int, ...], int]] = {}
        self.ints: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
        self.dtypes: dict[str, tuple[str, int]] = {}
        self.devices: dict[str, str] = {}
        self.version = 0
        self.compact: list[tuple[str, tuple[int, ...], int, int]] = []  # format 2: (key, shape, chunk, itemsize)
        self.layout: list[_LayoutEntry] | None = None

    def bad(self, msg: str) -> ManifestError:
        return ManifestError(f"{self.where}: {msg}")

    def charge(self, cost: int, what: str, *, transient: bool = False) -> None:
        if (cost if transient else self.json_used + cost) > self.budget:
            raise self.bad(
                f"{what} would need about {cost} bytes of memory to parse, more than the {self.budget} bytes allowed "
                f"for a {len(self.data)}-byte manifest; the manifest is hostile or damaged"
            )
        if not transient:
            self.json_used += cost

    # -- the two layouts ----------------------------------------------------------------------------------
    def read(self) -> Manifest:
        if self.data.startswith(b"{\n "):
            fields = self._read_lines()
        else:  # any other JSON spelling (hand-made manifests): parsed whole, within the same budget
            fields = self._read_any()
        return self._finish(fields)

    def _read_lines(self) -> dict[str, Any]:
        data, end = self.data, self.end
        mv = memoryview(data)
        fields: dict[str, Any] = {}
        pos, more = 2, True
        while pos < end:
            if not more:
                raise self.bad("a field follows the last one (a ',' is missing)")
            eol = data.find(b"\n", pos, end)
            if eol < 0:
                eol = end
            m = _FIELD_RE.match(data, pos, eol)
            if m is None:
                raise self.bad(
                    f"line at byte {pos} is not a field line ' \"name\":value' (the layout ckptstore writes: one "
                    "field per line, one tensor per line)"
                )
            key = m.group(1).decode()
            if key in fields:
                raise self.bad(f"duplicate field {key!r}")
            vpos = m.end()
            tail: str | bytes
            if key == "tensors":
                self._check_format(fields)
                rest = data[vpos:eol].strip(b" \t\r")
                if rest == b"{":  # then one row per line
                    eol, tail = self._read_rows(eol + 1)
                elif rest.startswith(b"{") and rest[1:].lstrip(b" \t").startswith(b"}"):
                    tail = rest[1:].lstrip(b" \t")[1:].strip(b" \t")
                else:
                    raise self.bad("field 'tensors' must be an object with one tensor per line")
                fields[key] = None
            elif key == "layout":
                if self._check_format(fields) < 2:
                    raise self.bad("field 'layout' is format 2; this manifest says format_version 1")
                rest = data[vpos:eol].strip(b" \t\r")
                if rest == b"{":
                    eol, tail = self._read_layout(eol + 1)
                else:  # any other JSON spelling, on one line
                    self.charge(json_cost(data, vpos, eol, ascii=self.ascii), "field 'layout'")
                    text = str(mv[vpos:eol], "utf-8")
                    try:
                        value, i = self.decoder.raw_decode(text, _WS.match(text).end())
                    except ValueError as e:
                        raise self.bad(f"field 'layout' is not valid JSON on its line ({e})") from None
                    tail = text[_WS.match(text, i).end() :]
                    self._layout_doc(value)
                fields[key] = None
            else:
                self.charge(json_cost(data, vpos, eol, ascii=self.ascii), f"field {key!r}")
                text = str(mv[vpos:eol], "utf-8")
                try:
                    value, i = self.decoder.raw_decode(text, _WS.match(text).end())
                except ValueError as e:
                    raise self.bad(f"field {key!r} is not valid JSON on its line ({e})") from None
                tail = text[_WS.match(text, i).end() :]
                del text
                fields[key] = value
                if key == "files":
                    self.files = self._files(value)
            if tail in (",", b","):
                more = True
            elif tail in ("", b""):
                more = False
            else:
                raise self.bad(f"unexpected text after field {key!r}")
            pos = eol + 1
        if more:
            raise self.bad("the manifest ends after a ','")
        return fields

    def _read_rows(self, pos: int) -> tuple[int, bytes]:
        """Tensor rows, one per line, up to the line `` }``; returns that line's end and what follows the brace."""
        data, end = self.data, self.end
        mv = memoryview(data)
        comma: bool | None = None  # did the previous row end with ","? (None: no row yet)
        while pos < end:
            eol = data.find(b"\n", pos, end)
            if eol < 0:
                eol = end
            if data.startswith(b" }", pos):
                if comma:
                    raise self.bad("the last tensor row ends with ','")
                return eol, data[pos + 2 : eol].strip(b" \t\r")
            if comma is False:
                raise self.bad("a ',' is missing between two tensor rows")
            comma = self._row(str(mv[pos:eol], "utf-8"))
            pos = eol + 1
        raise self.bad("the tensors object is not closed")

    def _read_layout(self, pos: int) -> tuple[int, bytes]:
        """Layout lines, one file per line, up to the line `` }``."""
        data, end = self.data, self.end
        mv = memoryview(data)
        out: list[_LayoutEntry] = []
        self.layout = out
        comma: bool | None = None
        while pos < end:
            eol = data.find(b"\n", pos, end)
            if eol < 0:
                eol = end
            if data.startswith(b" }", pos):
                if comma:
                    raise self.bad("the last layout line ends with ','")
                return eol, data[pos + 2 : eol].strip(b" \t\r")
            if comma is False:
                raise self.bad("a ',' is missing between two layout lines")
            m = _LAYOUT_RE.fullmatch(str(mv[pos:eol], "utf-8"))
            if m is None:
                raise self.bad(f'layout line at byte {pos} is not \'  "file":[part,first,end,start,"crc32c"(,k)]\'')
            name, p, a, b, st, crcs, k, tail = m.groups()
            out.append(
                self._layout_entry(
                    _unescape(name), int(p), int(a), int(b), int(st), crcs, _NO_K if k is None else int(k)
                )
            )
            comma = tail == ","
            pos = eol + 1
        raise self.bad("the layout object is not closed")

    def _layout_doc(self, lay: Any) -> None:
        if not isinstance(lay, dict):
            raise self.bad("field 'layout' must be an object")
        self.layout = []
        for name, v in lay.items():
            if not isinstance(v, list) or len(v) not in (5, 6):
                raise self.bad(f"layout of {name!r:.100} must be [part, first, end, start, crc32c] or [..., k]")
            self.layout.append(self._layout_entry(name, *v))

    def _layout_entry(self, name: Any, p: Any, a: Any, b: Any, st: Any, crcs: Any, k: Any = _NO_K) -> _LayoutEntry:
        if not all(_int(x, 0, MAX_INT64) for x in (p, a, b, st)) or not isinstance(crcs, str):
            raise self.bad(
                f"layout of {name!r:.100}: [part, first, end, start, crc32c] must be 4 integers and a string"
            )
        if k is _NO_K:
            k = 1
        elif not _int(k, 2, MAX_GROUP_PARTS):
            raise self.bad(
                f"layout of {name!r:.100}: group size k={k!r:.40} must be an integer in 2..{MAX_GROUP_PARTS} (a line "
                "without k has one checksum per part); the manifest is hostile or damaged"
            )
        try:
            raw = binascii.a2b_base64(crcs, strict_mode=True)
        except (binascii.Error, ValueError):
            raise self.bad(f"layout of {name!r:.100}: crc32c is not base64") from None
        return self._name(name), p, a, b, st, raw, k

    def _read_any(self) -> dict[str, Any]:
        data = self.data
        self.charge(json_cost(data, ascii=self.ascii), "the manifest (not in the line layout ckptstore writes)")
        try:
            doc = json.loads(str(memoryview(data), "utf-8"), parse_constant=_reject_constant)
        except ManifestError as e:
            raise self.bad(str(e)) from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int/str digit limits
            raise self.bad(f"not valid JSON ({e}); the step is damaged or not committed") from None
        if not isinstance(doc, dict):
            raise self.bad("top level must be a JSON object")
        self._check_format(doc)
        if isinstance(doc.get("files"), dict):
            self.files = self._files(doc["files"])
        rows = self._req(doc, "tensors", dict)
        doc["tensors"] = None
        lay = doc.pop("layout", None)
        if lay is not None:
            if self.version < 2:
                raise self.bad(f"field 'layout' is format 2; this manifest says format_version {self.version}")
            self._layout_doc(lay)
        for key in list(rows):
            self._row_dict(key, rows.pop(key))
        return doc

    # -- one tensor row -------------------------------------------------------------------------------------
    def _row(self, s: str) -> bool:
        """Parse one row line; returns whether it ends with ','."""
        m = _ROW_RE.match(s)
        if m is None:
            c = _CROW_RE.fullmatch(s)
            if c is None:
                return self._row_json(s)
            key_raw, dt_raw, shape_raw, dev_raw, chunk, tail = c.groups()
            key = _unescape(key_raw)
            dt = self.dtypes.get(dt_raw) or self._dtype(_unescape(dt_raw), f"tensor {key!r}")
            sh = self.raw_ints.get(shape_raw) or self._raw_ints(shape_raw)
            dev = self.devices.get(dev_raw) or self._device(_unescape(dev_raw), f"tensor {key!r}")
            self._add_compact(key, dt, sh, dev, int(chunk))
            return tail == ","
        key_raw, dt_raw, shape_raw, dev_raw, enc_raw = m.groups()
        key = _scanstring(key_raw + '"', 0)[0] if "\\" in key_raw else key_raw
        dt = self.dtypes.get(dt_raw) or self._dtype(_unescape(dt_raw), f"tensor {key!r}")
        sh = self.raw_ints.get(shape_raw) or self._raw_ints(shape_raw)
        dev = self.devices.get(dev_raw) or self._device(_unescape(dev_raw), f"tensor {key!r}")
        enc = "raw" if enc_raw is None else self._encoding(_unescape(enc_raw), dt[0], sh[0], f"tensor {key!r}")
        pieces: list[Piece] = []
        boxes: list[_Box] = []
        pos = m.end()
        if not s.startswith("]}", pos):
            match, names, ints, files = _PIECE_RE.match, self.raw_names, self.raw_ints, self.files
            shape, numel = sh
            nbytes = numel * dt[1]
            itemsize = dt[1]
            while True:
                pm = match(s, pos)
                if pm is None:
                    return self._row_json(s)
                f_raw, a, b, crc, o_raw, b_raw = pm.groups()
                fname = names.get(f_raw) or self._raw_name(f_raw)
                start, end = int(a), int(b)
                size = files.get(fname, -1) if files is not None else -1
                # The common cases inline; anything unusual goes through _piece, which has the precise errors.
                if o_raw is None and b_raw is None:
                    if start <= end <= size and end - start == nbytes:
                        if numel:
                            boxes.append(((0,) * len(shape), shape, numel))
                        pieces.append(_new_piece(Piece, (fname, start, end, int(crc, 16), None, None, None)))
                    else:
                        pieces.append(
                            self._piece(f"tensor {key!r}", dt, sh, fname, start, end, int(crc, 16), None, boxes)
                        )
                else:
                    box = (ints.get(o_raw) or self._raw_ints(o_raw), ints.get(b_raw) or self._raw_ints(b_raw))
                    offs, bshape, n = box[0][0], box[1][0], box[1][1]
                    if (
                        start <= end <= size
                        and end - start == n * itemsize
                        and len(offs) == len(shape) == len(bshape)
                        and (
                            offs[0] + bshape[0] <= shape[0] and offs[1] + bshape[1] <= shape[1]
                            if len(shape) == 2  # the usual chunk of a matrix, without a generator
                            else all(o + x <= g for o, x, g in zip(offs, bshape, shape))
                        )
                    ):
                        if n:
                            boxes.append((offs, bshape, n))
                        pieces.append(_new_piece(Piece, (fname, start, end, int(crc, 16), offs, bshape, None)))
                    else:
                        pieces.append(
                            self._piece(f"tensor {key!r}", dt, sh, fname, start, end, int(crc, 16), box, boxes)
                        )
                pos = pm.end()
                if s.startswith(",", pos):
                    pos += 1
                    continue
                break
            if not s.startswith("]}", pos):
                return self._row_json(s)
        tail = s[pos + 2 :]
        if tail not in ("", ","):
            return self._row_json(s)
        self._add(key, dt[0], sh, dev, enc, pieces, boxes)
        return tail == ","

    def _row_json(self, s: str) -> bool:
        """A row line in any JSON spelling (and the precise error for a malformed one)."""
        self.charge(json_cost(s), "a tensor row", transient=True)
        i = _WS.match(s).end()
        try:
            if not s.startswith('"', i):
                raise ValueError("expected a tensor key")
            key, i = _scanstring(s, i + 1)
            i = _WS.match(s, i).end()
            if not s.startswith(":", i):
                raise ValueError("expected ':'")
            row, i = self.decoder.raw_decode(s, _WS.match(s, i + 1).end())
        except ValueError as e:
            raise self.bad(f"tensor row is not valid JSON ({e}): {s[:200]!r}") from None
        tail = s[_WS.match(s, i).end() :]
        if tail not in ("", ","):
            raise self.bad(f"unexpected text after the row of tensor {key!r}")
        self._row_dict(key, row)
        return tail == ","

    def _row_dict(self, key: Any, t: Any) -> None:
        if not isinstance(key, str):
            raise self.bad(f"tensor key {key!r} is not a string")
        w = f"tensor {key!r}"
        if not isinstance(t, dict):
            raise self.bad(f"{w} is not an object")
        dt = self._dtype(t.get("dtype"), w)
        sh = self._ints(t.get("shape"), "shape", w)
        dev = self._device(t.get("device", "cpu"), w)
        enc = self._encoding(t.get("encoding", "raw"), dt[0], sh[0], w)
        if "chunk" in t and "pieces" not in t:
            if enc != "raw" or not _int(t["chunk"], 1, MAX_NUMEL):
                raise self.bad(f"{w}: chunk must be a positive integer (and the tensor raw)")
            self._add_compact(key, dt, sh, dev, t["chunk"])
            return
        pieces_doc = t.get("pieces")
        if not isinstance(pieces_doc, list):
            raise self.bad(f"{w}: pieces must be a list")
        pieces: list[Piece] = []
        boxes: list[_Box] = []
        for p in pieces_doc:
            if not isinstance(p, dict):
                raise self.bad(f"{w}: piece is not an object")
            fname = self._name(p.get("file"))
            rng = p.get("range")
            if not isinstance(rng, list) or len(rng) != 2 or not all(_int(x, 0, MAX_INT64) for x in rng):
                raise self.bad(f"{w}: byte range {rng!r:.100} must be [start, end], non-negative integers")
            crc = p.get("crc32c")
            if not isinstance(crc, str) or not _HEX8_S.fullmatch(crc):
                raise self.bad(f"{w}: crc32c must be 8 lowercase hex digits")
            box = None
            if "offsets" in p or "shape" in p:
                box = (self._ints(p.get("offsets"), "piece offsets", w), self._ints(p.get("shape"), "piece shape", w))
            pieces.append(self._piece(w, dt, sh, fname, rng[0], rng[1], int(crc, 16), box, boxes))
        self._add(key, dt[0], sh, dev, enc, pieces, boxes)

    def _piece(
        self,
        w: str,
        dt: tuple[str, int],
        sh: tuple[tuple[int, ...], int],
        fname: str,
        start: int,
        end: int,
        crc: int,
        box: tuple[tuple[tuple[int, ...], int], tuple[tuple[int, ...], int]] | None,
        boxes: list[_Box],
    ) -> Piece:
        if not start <= end <= MAX_INT64:
            raise self.bad(f"{w}: invalid byte range [{start}, {end}]")
        files = self.files
        if files is not None:
            size = files.get(fname)
            if size is None:
                raise self.bad(f"{w}: piece refers to file {fname!r} that the manifest does not list")
            if end > size:
                raise self.bad(f"{w}: byte range [{start}, {end}] lies outside file {fname!r} ({size} B)")
        shape, numel = sh
        if box is None:
            n = numel
            if n:
                boxes.append(((0,) * len(shape), shape, n))
            offs = bshape = None
        else:
            (offs, _), (bshape, n) = box
            if len(offs) != len(shape) or len(bshape) != len(shape):
                raise self.bad(f"{w}: piece box rank does not match the tensor's")
            for o, s, g in zip(offs, bshape, shape):
                if o + s > g:
                    raise self.bad(f"{w}: piece box {list(offs)}+{list(bshape)} exceeds shape {list(shape)}")
            if n:
                boxes.append((offs, bshape, n))
        # Exactly the bytes of the box: readers size every buffer from it, so a mismatch could read past one.
        if n * dt[1] != end - start:
            raise self.bad(
                f"{w}: piece byte range [{start}, {end}] does not match its shape and dtype "
                f"({n} x {dt[0]} = {n * dt[1]} bytes)"
            )
        return _new_piece(Piece, (fname, start, end, crc, offs, bshape, None))

    def _add_compact(
        self, key: str, dt: tuple[str, int], sh: tuple[tuple[int, ...], int], dev: str, chunk: int
    ) -> None:
        if self.version < 2:
            raise self.bad(f'tensor {key!r}: a compact row ("chunk") is format 2; this manifest says format 1')
        if key in self.tensors:
            raise self.bad(f"duplicate tensor key {key!r}")
        shape = sh[0]
        if not shape or not 1 <= chunk <= shape[0]:
            raise self.bad(f"tensor {key!r}: chunk {chunk} must be in 1..{shape[0] if shape else 0} (its dim 0)")
        self.compact.append((key, shape, chunk, dt[1]))
        self.tensors[key] = _new_entry(TensorEntry, (dt[0], shape, (), dev, "raw"))  # pieces filled in _finish

    def _add(
        self,
        key: str,
        dtype: str,
        sh: tuple[tuple[int, ...], int],
        dev: str,
        enc: str,
        pieces: list[Piece],
        boxes: list[_Box],
    ) -> None:
        if key in self.tensors:
            raise self.bad(f"duplicate tensor key {key!r}")
        shape, numel = sh
        if len(boxes) != 1 or boxes[0][2] != numel:  # else: one box holding every element, the whole tensor
            check_cover(shape, numel, boxes, f"{self.where}: tensor {key!r}")
        if self.files is None:
            self.unchecked.append(key)
        self.tensors[key] = _new_entry(TensorEntry, (dtype, shape, tuple(pieces), dev, enc))

    # -- interned values ------------------------------------------------------------------------------------
    def _dtype(self, name: Any, w: str) -> tuple[str, int]:
        dt = tensor_dtype(name, f"{self.where}: {w}")
        out = self.dtypes[name] = (name, dt.itemsize)
        return out

    def _device(self, v: Any, w: str) -> str:
        if isinstance(v, str) and v in self.devices:
            return self.devices[v]
        check_device(v, f"{self.where}: {w}")
        self.devices[v] = v
        return v  # type: ignore[no-any-return]

    def _encoding(self, v: Any, dtype: str, shape: tuple[int, ...], w: str) -> str:
        if v == "raw":
            return "raw"
        if v == "pickle":
            if dtype != "uint8" or len(shape) != 1:
                raise self.bad(f"{w}: a pickle is stored as 1-D uint8 bytes, not {dtype}{list(shape)}")
            return "pickle"
        raise self.bad(f"{w}: unknown encoding {v!r}")

    def _raw_name(self, raw: str) -> str:
        name = self.names.get(_unescape(raw)) or self._name(_unescape(raw))
        self.raw_names[raw] = name
        return name

    def _name(self, name: Any) -> str:
        out = self.names.get(name) if isinstance(name, str) else None
        if out is None:
            out = self.names[name] = check_file_name(name)
        return out

    def _raw_ints(self, raw: str | None) -> tuple[tuple[int, ...], int]:
        v = tuple(int(x) for x in raw.split(",")) if raw else ()
        out = self.raw_ints[raw] = self._intern(v)
        return out

    def _ints(self, v: Any, what: str, w: str) -> tuple[tuple[int, ...], int]:
        if not isinstance(v, list) or not all(_int(x, 0, MAX_NUMEL) for x in v):
            raise self.bad(f"{w}: {what} must be a list of non-negative integers (at most 2**62), got {v!r:.200}")
        return self._intern(tuple(v))

    def _intern(self, v: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        """``(v, product of v)``, shared between equal tuples; ``ManifestError`` past :data:`MAX_NUMEL`."""
        out = self.ints.get(v)
        if out is None:
            if any(x > MAX_NUMEL for x in v):
                raise self.bad(f"a shape or offset has a dimension larger than 2**62: {list(v)!r:.200}")
            n = 0 if 0 in v else 1
            if n:
                for x in v:
                    n *= x
                    if n > MAX_NUMEL:
                        raise self.bad(f"a shape with {len(v)} dimensions has more than 2**62 elements")
            out = self.ints[v] = (v, n)
        return out

    # -- fields ---------------------------------------------------------------------------------------------
    def _req(self, doc: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
        if key not in doc:
            raise self.bad(f"missing field {key!r}")
        v = doc[key]
        if not isinstance(v, types) or (
            isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        ):
            raise self.bad(f"field {key!r} has the wrong type ({type(v).__name__})")
        return v

    def _check_format(self, doc: dict[str, Any]) -> int:
        if doc.get("format") != FORMAT_NAME:
            raise self.bad(f"not a ckptstore manifest (format={doc.get('format')!r:.100})")
        version = self._req(doc, "format_version", int)
        if version > FORMAT_VERSION:
            raise self.bad(
                f"format_version {version!r:.40} was written by a newer ckptstore (this one reads up to "
                f"{FORMAT_VERSION}); upgrade ckptstore to read it"
            )
        if version < 1:
            raise self.bad(f"invalid format_version {version!r:.40}")
        self.version = version
        return version  # type: ignore[no-any-return]

    def _files(self, files_doc: Any) -> dict[str, int]:
        if not isinstance(files_doc, dict):
            raise self.bad("field 'files' must be an object")
        files: dict[str, int] = {}
        for name, size in files_doc.items():
            name = self._name(name)
            if not _int(size, 0, MAX_INT64):
                raise self.bad(f"size of file {name!r} must be an integer in 0..2**63-1")
            files[name] = size
        return files

    def _finish(self, doc: dict[str, Any]) -> Manifest:
        version = self._check_format(doc)
        if self.files is None:
            self.files = self._files(self._req(doc, "files", dict))
        if "tensors" not in doc:
            raise self.bad("missing field 'tensors'")
        files, tensors = self.files, self.tensors
        for key in self.unchecked:  # rows read before "files" (not the layout ckptstore writes)
            for p in tensors[key].pieces:
                if p.file not in files:
                    raise self.bad(f"tensor {key!r}: piece refers to file {p.file!r} that the manifest does not list")
                if p.end > files[p.file]:
                    raise self.bad(f"tensor {key!r}: byte range [{p.start}, {p.end}] lies outside file {p.file!r}")
        if self.compact or self.layout:
            if not self.compact:
                raise self.bad("field 'layout' describes files but no tensor row is compact")
            ix = _LayoutIndex(
                [(shape, c, isz) for _, shape, c, isz in self.compact],
                self.layout or [],
                files,
                # every checksum of the layout is 4 bytes (5.33 in base64) and covers at most MAX_GROUP_PARTS parts
                len(self.data) // 5 * MAX_GROUP_PARTS,
                self.where,
            )
            for row, (key, shape, _, isz) in enumerate(self.compact):
                e = tensors[key]
                tensors[key] = _new_entry(
                    TensorEntry, (e.dtype, shape, SplitPieces(ix, row, shape, isz), e.device, "raw")
                )
        step = self._req(doc, "step", int)
        if not 0 <= step <= MAX_STEP:
            raise self.bad(f"step {step!r:.40} is out of range (0..2**63-1)")
        epoch = doc.get("epoch")
        if epoch is not None and not _int(epoch, -MAX_INT64, MAX_INT64):
            raise self.bad("epoch must be null or an integer in -2**63+1..2**63-1")
        metrics, metadata = doc.get("metrics"), doc.get("metadata")
        metrics = {} if metrics is None else metrics
        metadata = {} if metadata is None else metadata
        if not isinstance(metrics, dict) or not isinstance(metadata, dict):
            raise self.bad("metrics and metadata must be objects")
        created_at = doc.get("created_at", 0.0)
        if (
            isinstance(created_at, bool)
            or not isinstance(created_at, (int, float))
            or not 0 <= created_at <= MAX_CREATED_AT  # also refuses nan/inf (1e400 parses as inf)
        ):
            raise self.bad(f"created_at must be a Unix time between 0 and {MAX_CREATED_AT:.0f}, got {created_at!r:.40}")
        world_size = doc.get("world_size", 1)
        if not _int(world_size, 1, MAX_WORLD_SIZE):
            raise self.bad(f"world_size must be an integer in 1..{MAX_WORLD_SIZE}")
        nbytes = doc.get("nbytes", 0)
        if not _int(nbytes, 0, 1 << 80):
            raise self.bad("nbytes must be a non-negative integer")
        versions = doc.get("versions")
        extras = doc.get("extras")
        versions = {} if versions is None else versions
        extras = {} if extras is None else extras
        if not isinstance(versions, dict) or not isinstance(extras, dict):
            raise self.bad("versions and extras must be objects")
        if not all(v is None or isinstance(v, (str, int, float)) for v in versions.values()):
            raise self.bad("versions must map names to strings")
        save_id = doc.get("save_id", "")
        if not isinstance(save_id, str):
            raise self.bad("save_id must be a string")
        if "tree" not in doc:
            raise self.bad("missing field 'tree'")
        check_tree(doc["tree"], tensors, self.where)
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
            save_id=save_id,
            versions={str(k): str(v) for k, v in versions.items()},
            extras=extras,
            format_version=version,
        )


# -- format 2: compact rows of evenly split tensors -------------------------------------------------------------
# A tensor split along dim 0 into parts of ``chunk`` rows (the last may be shorter: torch.chunk sizes, what FSDP2
# and DTensor Shard(0) hold) is one row ``{"dtype":..,"shape":..,"device":..,"chunk":c}`` without pieces. Where
# its parts are is said by the ``layout`` field, one line per shard file holding such parts:
#
#     "shard-9f1c2a7b-r3-0.safetensors":[3,0,120,4096,"<base64>"]      (part, first row, end row, start, crc32c)
#     "shard-9f1c2a7b-r3-0.safetensors":[3,0,120,4096,"<base64>",16]   (the same, one crc32c per 16 parts)
#
# meaning: that file holds, back to back from byte ``start`` to its end, part 3 of every compact row with index
# (among the compact rows, in manifest order) in [0, 120) that has a part 3, in row order; the base64 string is
# the big-endian crc32c of each of those parts, or with a 6th element ``k`` (2..MAX_GROUP_PARTS) of each group of
# ``k`` consecutive parts in file order (the last group may be shorter: ceil(n / k) checksums), the crc32c of the
# group's bytes back to back. A file's description is O(1) plus 4 bytes per part or group: nothing per part
# repeats the file name, the byte range or the box. Every part of every compact row lies in exactly one such file
# (checked when parsing, in O((rows + files) log rows), without expanding a piece). A part of a group of several
# parts is a Piece whose ``span`` is the group's bytes: readers read and check the group (once for all the parts
# of it they need), so a damaged byte anywhere in a group fails the read of any part of it.


_OFFSETS = operator.itemgetter(4)
_CRC = operator.itemgetter(3)
_START = operator.itemgetter(1)
_END = operator.itemgetter(2)
_ITEM_PIECE = operator.itemgetter(3)
_SPAN = operator.itemgetter(6)


def _as_split(te: TensorEntry, itemsize: int) -> tuple[int, list[Piece]] | None:
    """``(chunk, pieces in part order)`` when the entry's pieces are exactly the dim-0 parts of ``chunk`` rows."""
    shape, pieces = te.shape, te.pieces
    if te.encoding != "raw" or not shape or len(pieces) < 2 or not shape[0]:
        return None
    if None in map(_OFFSETS, pieces):
        return None
    ps = sorted(pieces, key=_OFFSETS)
    d0, rest = shape[0], shape[1:]
    c = ps[0][5][0] if ps[0][5] else 0
    n = len(ps)
    if c < 1 or -(-d0 // c) != n:
        return None
    rb = math.prod(rest) * itemsize
    zeros = (0,) * len(rest)
    full_shape, full_bytes = (c, *rest), c * rb
    last_rows = d0 - (n - 1) * c
    for i, p in enumerate(ps):  # p: (file, start, end, crc32c, offsets, shape)
        o = p[4]
        if i < n - 1:
            if p[5] != full_shape or p[2] - p[1] != full_bytes or o[0] != i * c or o[1:] != zeros:
                return None
        elif p[5] != (last_rows, *rest) or p[2] - p[1] != last_rows * rb or o[0] != i * c or o[1:] != zeros:
            return None
    return c, ps


def _compact_layout(m: Manifest) -> tuple[dict[str, int], list[str]]:
    """:func:`_compact_rows`, retried with only the rows of the most parts when the layout would be too sparse
    for the reader's span budget (many rows with few parts between the rows of many). Rows that are already a
    reader's index (parsed, or assembled from the ranks' lines by :mod:`ckptstore.format.compact`) keep their
    lines as they are, without expanding a part."""
    kept = _compact_from_index(m)
    if kept is not None:
        return kept
    try:
        return _compact_rows(m, 0)
    except _TooSparse as e:
        try:
            return _compact_rows(m, e.max_parts)
        except _TooSparse:
            return {}, []


def _compact_from_index(m: Manifest) -> tuple[dict[str, int], list[str]] | None:
    """The compact rows and lines of ``m`` when its compact rows are exactly the rows of one :class:`_LayoutIndex`
    (in order) whose lines still fit ``m.files`` (checked again with the reader's code); else None."""
    ix = None
    rows: list[tuple[tuple[int, ...], int, int]] = []
    compact: dict[str, int] = {}
    for key, te in m.tensors.items():
        ps = te.pieces
        if not isinstance(ps, SplitPieces):
            continue
        if ix is None:
            ix = ps._ix
        if ps._ix is not ix or ps._row != len(rows) or te.dtype not in STORABLE_DTYPES:
            return None
        rows.append((tuple(te.shape), ps.chunk, STORABLE_DTYPES[te.dtype].itemsize))
        compact[key] = ps.chunk
    if ix is None or len(rows) != len(ix.np):
        return None
    try:
        _LayoutIndex(rows, ix.entries, m.files, MAX_MANIFEST_BYTES // 5, f"the manifest of step {m.step}")
    except ManifestError as e:
        log.debug("compact rows re-laid out: %s", e)
        return None
    lines = []
    for f, p, a, b, s, crcs, k in ix.entries:
        b64 = binascii.b2a_base64(crcs, newline=False).decode()
        tail = f",{k}]" if k > 1 else "]"
        lines.append(f'  {_json_str(f)}:[{p},{a},{b},{s},"{b64}"{tail}')
    return compact, lines


class _TooSparse(Exception):
    def __init__(self, max_parts: int) -> None:
        self.max_parts = max_parts


def _compact_rows(m: Manifest, min_parts: int, check: bool = True) -> tuple[dict[str, int], list[str]]:
    """Which rows of ``m`` are written compact (``{key: chunk}``) and the ``layout`` lines for their files. A row is
    compact when its pieces are the dim-0 parts of one chunk size and every one of its files holds nothing but
    parts of one index of such rows, back to back to the end of the file, in row order. ``O(pieces)``."""
    files = m.files
    keys = list(m.tensors)
    pos_of = {k: i for i, k in enumerate(keys)}
    nparts = [0] * len(keys)
    cand: dict[str, tuple[int, list[Piece]]] = {}
    by_file: dict[str, list[tuple[int, int, Piece]]] = {}
    blocked: set[str] = set()
    for i, (key, te) in enumerate(m.tensors.items()):
        got = _as_split(te, STORABLE_DTYPES[te.dtype].itemsize) if te.dtype in STORABLE_DTYPES else None
        if got is not None and len(got[1]) < min_parts:
            got = None
        if got is None:
            for p in te.pieces:
                blocked.add(p.file)
            continue
        cand[key] = got
        nparts[i] = len(got[1])
        get = by_file.get
        for part, p in enumerate(got[1]):
            lst = get(p[0])
            if lst is None:
                lst = by_file[p[0]] = []
            lst.append((p[1], i, part, p))  # type: ignore[arg-type]
    if not cand:
        return {}, []
    for f, items in by_file.items():  # one part, back to back to the end of the file, rows ascending
        if f in blocked:
            continue
        items.sort()
        part = items[0][2]
        ok = files.get(f) == items[-1][0] + items[-1][3].nbytes  # type: ignore[misc]
        prev_end, prev_row = items[0][0], -1
        for start, row, p_, pc in items:  # type: ignore[misc]
            if p_ != part or start != prev_end or row <= prev_row:
                ok = False
                break
            prev_end, prev_row = pc.end, row
        if not ok:
            blocked.add(f)
    todo = list(blocked)
    while True:
        # Rows with a part in a blocked file are written explicitly, which blocks their other files in turn.
        while todo:
            f = todo.pop()
            for _, row, _, _ in by_file.get(f, ()):  # type: ignore[misc]
                got = cand.pop(keys[row], None)
                if got is None:
                    continue
                nparts[row] = 0
                for p in got[1]:
                    if p.file not in blocked:
                        blocked.add(p.file)
                        todo.append(p.file)
        # A file must hold a run: no compact row with its part between two of its rows (checked against the
        # rows still compact; dropping rows only removes such gaps, so this converges).
        for f, items in by_file.items():
            if f in blocked:
                continue
            part = items[0][2]
            for (_, r0, _, _), (_, r1, _, _) in itertools.pairwise(items):  # type: ignore[misc]
                if r1 - r0 > 1 and any(nparts[k] > part for k in range(r0 + 1, r1)):
                    blocked.add(f)
                    todo.append(f)
                    break
        if not todo:
            break
    if not cand:
        return {}, []
    cidx: dict[int, int] = {}
    for key in keys:
        if key in cand:
            cidx[pos_of[key]] = len(cidx)
    lines = []
    entries = []
    for f, items in by_file.items():
        if f in blocked:
            continue
        k, group_crcs = _group_crcs(f, list(map(_ITEM_PIECE, items)), m.step)
        crcs = struct.pack(f">{len(group_crcs)}I", *group_crcs)
        a, b = cidx[items[0][1]], cidx[items[-1][1]] + 1  # type: ignore[misc]
        b64 = binascii.b2a_base64(crcs, newline=False).decode()
        tail = f",{k}]" if k > 1 else "]"
        lines.append(f'  {_json_str(f)}:[{items[0][2]},{a},{b},{items[0][0]},"{b64}"{tail}')  # type: ignore[misc]
        entries.append((f, items[0][2], a, b, items[0][0], crcs, k))  # type: ignore[misc]
    # What the reader will check, checked here with the reader's own code: never commit a layout it refuses.
    rows = [(m.tensors[k].shape, cand[k][0], STORABLE_DTYPES[m.tensors[k].dtype].itemsize) for k in keys if k in cand]
    try:
        if check:
            _LayoutIndex(
                rows, entries, files, MAX_MANIFEST_BYTES // 5 * MAX_GROUP_PARTS, f"the manifest of step {m.step}"
            )
    except _SpanError:
        raise _TooSparse(max(len(v[1]) for v in cand.values())) from None
    except ManifestError as e:  # a bug, not the caller's fault: the explicit rows are always readable
        log.warning("format 2 layout refused by its own reader (%s); writing every row explicitly", e)
        return {}, []
    return {k: v[0] for k, v in cand.items()}, lines


def _group_crcs(f: str, parts: Sequence[Piece], step: int) -> tuple[int, list[int]]:
    """The group size ``k`` of a file's layout line and its checksums: one per group of ``k`` consecutive parts
    (``parts`` in file order; 1: one checksum per part). Every group holds at most :data:`GROUP_BYTES`: ``k``
    starts at ``GROUP_BYTES // largest part`` and grows (doubling, then a few bisection steps) while every group
    still fits, as most parts are much smaller than a file's largest. Parts read from a grouped layout (their
    ``span`` set) keep their groups and checksums, so a parsed manifest writes back the bytes it was read from."""
    if any(map(_SPAN, parts)):
        return _regroup(f, parts, step)
    lens = list(map(operator.sub, map(_END, parts), map(_START, parts)))
    k = _group_size(lens)
    crcs = list(map(_CRC, parts))
    if k < 2:
        return 1, crcs
    return k, crc32c_groups(crcs, lens, k)


def _group_size(lens: list[int]) -> int:
    """The largest ``k`` found (``O(n)`` in all) such that every group of ``k`` consecutive ``lens`` (the last
    group may be shorter) sums to at most :data:`GROUP_BYTES`; at most ``MAX_GROUP_PARTS`` and ``n``."""
    n = len(lens)
    cap = min(n, MAX_GROUP_PARTS)
    largest = max(lens)
    if cap < 2 or largest > GROUP_BYTES:
        return 1
    good = min(cap, max(1, GROUP_BYTES // largest)) if largest else cap
    if good == cap:
        return good
    pre = [0, *itertools.accumulate(lens)]

    def fits(k: int) -> bool:
        ends = pre[k::k]
        if n % k:
            ends.append(pre[n])
        return max(map(operator.sub, ends, pre[0:n:k])) <= GROUP_BYTES

    bad = cap + 1
    k = 2 * good
    while k <= cap:
        if not fits(k):
            bad = k
            break
        good, k = k, 2 * k
    else:
        if good < cap and fits(cap):
            return cap
    for _ in range(4):
        mid = (good + bad) // 2
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _regroup(f: str, parts: Sequence[Piece], step: int) -> tuple[int, list[int]]:
    """``(k, group checksums)`` of parts that carry group checksums (read from a layout line with ``k``)."""
    n = len(parts)
    first = parts[0].span
    k = 1
    if first is not None:
        while k < n and parts[k].start < first[1]:
            k += 1
    out = []
    for lo in range(0, n, k):
        hi = min(n, lo + k)
        want = None if hi - lo == 1 else (parts[lo].start, parts[hi - 1].end)
        crc = parts[lo].crc32c
        if k < 2 or any(p.span != want or p.crc32c != crc for p in parts[lo:hi]):
            raise ManifestError(
                f"the manifest of step {step}: the parts in {f!r} carry checksums of groups of parts that are not "
                f"groups of k consecutive parts of the file (at part {lo}); they cannot be written in a layout line"
            )
        out.append(crc)
    return k, out


def _compact_json(t: TensorEntry, chunk: int, memo: dict[str, str]) -> str:
    def js(v: str) -> str:
        out = memo.get(v)
        if out is None:
            out = memo[v] = _json_str(v)
        return out

    return f'{{"dtype":{js(t.dtype)},"shape":{_ints(t.shape)},"device":{js(t.device)},"chunk":{int(chunk)}}}'


class _SpanError(ManifestError):
    """The layout's row ranges are too sparse for their parts (the writer then writes fewer rows compact)."""


class _LayoutIndex:
    """The parsed ``layout`` of a format-2 manifest: validated, and where each part of a compact row is."""

    def __init__(
        self,
        rows: Sequence[tuple[tuple[int, ...], int, int]],
        entries: Sequence[_LayoutEntry],
        files: Mapping[str, int],
        max_parts: int,
        where: str,
    ) -> None:
        def bad(msg: str) -> ManifestError:
            return ManifestError(f"{where}: {msg}")

        # rows: (shape, chunk, itemsize). At most k parts per checksum of every line: no more parts than that.
        max_parts = min(max_parts, sum(e[6] * -(-len(e[5]) // 4) for e in entries))
        n_rows = len(rows)
        np_, full_, last_ = [0] * n_rows, [0] * n_rows, [0] * n_rows
        total = 0
        for i, (shape, c, itemsize) in enumerate(rows):
            d0 = shape[0]
            n = -(-d0 // c)
            total += n
            if total > max_parts:
                raise bad(
                    f"its compact rows have more than {max_parts} parts, more than its layout can describe; the "
                    "manifest is hostile or damaged"
                )
            rb = math.prod(shape[1:]) * itemsize
            np_[i], full_[i], last_[i] = n, c * rb, (d0 - (n - 1) * c) * rb
        self.np, self.full, self.last = np_, full_, last_
        self.chunks = [r[1] for r in rows]
        seen: set[str] = set()
        span = 0
        for f, _, a, b, _, _, _ in entries:
            span += b - a
            if f in seen:
                raise bad(f"file {f!r} is described twice in the layout")
            seen.add(f)
            if f not in files:
                raise bad(f"the layout describes file {f!r} that the manifest does not list")
            if not 0 <= a < b <= n_rows:
                raise bad(f"the layout of {f!r} names rows [{a}, {b}) but there are {n_rows} compact rows")
        # Finding a part walks its file's row range once: the ranges may not hold far more rows than parts.
        if span > 16 * total + 4 * n_rows + 4096:
            raise _SpanError(
                f"{where}: the layout's files span {span} rows for {total} parts, too sparse to index (ckptstore "
                "never writes one); the manifest is hostile or damaged"
            )
        # Parts and bytes of every entry: offline over the parts, descending, with two Fenwick trees.
        cnt = [0] * len(entries)
        nbytes = [0] * len(entries)
        by_np: dict[int, tuple[list[int], list[int]]] = {}
        for i in range(n_rows):
            lst = by_np.setdefault(np_[i], ([], [0]))
            lst[0].append(i)
            lst[1].append(lst[1][-1] + last_[i])
        rows_desc = sorted(range(n_rows), key=lambda i: -np_[i])
        bit_c, bit_f = [0] * (n_rows + 1), [0] * (n_rows + 1)

        def add(bit: list[int], i: int, v: int) -> None:
            i += 1
            while i <= n_rows:
                bit[i] += v
                i += i & -i

        def upto(bit: list[int], i: int) -> int:
            out = 0
            while i > 0:
                out += bit[i]
                i -= i & -i
            return out

        pc = pf = 0
        for e in sorted(range(len(entries)), key=lambda e: -entries[e][1]):
            f, p, a, b, s, crcs, k = entries[e]
            while pc < n_rows and np_[rows_desc[pc]] > p:
                add(bit_c, rows_desc[pc], 1)
                pc += 1
            while pf < n_rows and np_[rows_desc[pf]] > p + 1:
                add(bit_f, rows_desc[pf], full_[rows_desc[pf]])
                pf += 1
            n = upto(bit_c, b) - upto(bit_c, a)
            nb = upto(bit_f, b) - upto(bit_f, a)
            lst = by_np.get(p + 1)
            if lst is not None:
                nb += lst[1][bisect.bisect_left(lst[0], b)] - lst[1][bisect.bisect_left(lst[0], a)]
            if not n:
                raise bad(f"the layout of {f!r} names no part (part {p} of rows [{a}, {b}))")
            if k > n:
                raise bad(f"the layout of {f!r} groups its checksums by k={k} parts, but the file holds {n} parts")
            if len(crcs) != 4 * -(-n // k):
                raise bad(
                    f"the layout of {f!r} has {len(crcs) // 4} checksums for {n} parts"
                    + (f" in groups of {k} (want {-(-n // k)})" if k > 1 else "")
                )
            if s + nb != files[f]:
                raise bad(
                    f"the layout of {f!r} puts {nb} bytes of parts at byte {s}, but the file has {files[f]} bytes"
                )
            cnt[e], nbytes[e] = n, nb
        # Every part of every compact row in exactly one file: per part, disjoint row ranges holding them all.
        need = sorted(np_, reverse=True)
        by_part: dict[int, list[tuple[int, int]]] = {}
        for e, (_, p, a, _, _, _, _) in enumerate(entries):
            by_part.setdefault(p, []).append((a, e))
        self.by_part: dict[int, tuple[list[int], list[int]]] = {}
        j = len(need)
        for p in sorted(by_part):  # ascending: fewer rows have a part p as p grows
            lst = sorted(by_part[p])
            prev_b = 0
            for a, e in lst:
                if a < prev_b:
                    raise bad(f"two files of the layout hold part {p} of the same compact rows")
                prev_b = entries[e][3]
            while j and need[j - 1] <= p:
                j -= 1
            if sum(cnt[e] for _, e in lst) != j:
                raise bad(f"the layout holds {sum(cnt[e] for _, e in lst)} parts {p} of compact rows, not {j}")
            self.by_part[p] = ([a for a, _ in lst], [e for _, e in lst])
        if total != sum(cnt):
            raise bad(f"the layout holds {sum(cnt)} parts of compact rows, which have {total}")
        self.entries = list(entries)
        self.cnt = cnt
        self._pos: dict[int, tuple[array, array]] = {}

    def locate(self, row: int, part: int) -> tuple[str, int, int, int, tuple[int, int] | None]:
        """``(file, start, end, crc32c, span)`` of ``part`` of compact ``row``: ``span`` (None: the part itself)
        is the byte range ``crc32c`` covers, the part's group when its line has a group size."""
        starts, eids = self.by_part[part]
        e = eids[bisect.bisect_right(starts, row) - 1]
        f, _, a, _, s, crcs, k = self.entries[e]
        tab = self._pos.get(e)
        if tab is None:
            tab = self._pos[e] = self._table(e)
        offs = tab[1]
        i = tab[0][row - a]  # the part's index in its file
        if k == 1:
            return f, s + offs[i], s + offs[i + 1], int.from_bytes(crcs[4 * i : 4 * i + 4], "big"), None
        g = i // k
        lo, hi = g * k, min(g * k + k, self.cnt[e])
        span = None if hi - lo == 1 else (s + offs[lo], s + offs[hi])
        return f, s + offs[i], s + offs[i + 1], int.from_bytes(crcs[4 * g : 4 * g + 4], "big"), span

    def _table(self, e: int) -> tuple[array, array]:
        """Per row of the entry's range, the index of its part in the file; per part, its offset after the
        entry's start (and the end of the last)."""
        _, p, a, b, _, _, _ = self.entries[e]
        idx, offs = array("q", bytes(8 * (b - a))), array("q", bytes(8 * (self.cnt[e] + 1)))
        np_, full, last = self.np, self.full, self.last
        cur = k = 0
        for j in range(a, b):
            n = np_[j]
            if n > p:
                idx[j - a], offs[k] = k, cur
                cur += full[j] if p < n - 1 else last[j]
                k += 1
        offs[k] = cur
        return idx, offs


class SplitPieces(Sequence[Piece]):
    """The pieces of a compact (format 2) row, made on access: ``len``, indexing and iteration as a tuple of
    :class:`Piece`; :meth:`intersecting` finds the parts a box needs by arithmetic."""

    __slots__ = ("_ix", "_row", "chunk", "nbytes", "shape")

    def __init__(self, ix: _LayoutIndex, row: int, shape: tuple[int, ...], itemsize: int) -> None:
        self._ix, self._row, self.shape = ix, row, shape
        self.chunk = ix.chunks[row]
        self.nbytes = math.prod(shape) * itemsize

    def __len__(self) -> int:
        return self._ix.np[self._row]

    def _piece(self, p: int) -> Piece:
        f, start, end, crc, span = self._ix.locate(self._row, p)
        c, shape = self.chunk, self.shape
        rows = min(c, shape[0] - p * c)
        zeros = (0,) * (len(shape) - 1)
        return _new_piece(Piece, (f, start, end, crc, (p * c, *zeros), (rows, *shape[1:]), span))

    def __getitem__(self, i: Any) -> Any:
        n = len(self)
        if isinstance(i, slice):
            return tuple(self._piece(p) for p in range(*i.indices(n)))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("piece index out of range")
        return self._piece(i)

    def __iter__(self) -> Any:
        return (self._piece(p) for p in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, SplitPieces)):
            return len(self) == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"SplitPieces({len(self)} parts of {self.chunk} rows)"

    def intersecting(self, offsets: Sequence[int], shape: Sequence[int]) -> list[Piece]:
        """The parts that intersect the box ``offsets`` + ``shape``, in order: ``O(parts returned)``."""
        if not shape or 0 in shape:
            return []
        c, d0 = self.chunk, self.shape[0]
        lo = max(0, offsets[0]) // c
        hi = min(len(self), -(-min(d0, offsets[0] + shape[0]) // c))
        return [self._piece(p) for p in range(lo, hi)]


def pieces_in_box(entry: TensorEntry, offsets: Sequence[int], shape: Sequence[int]) -> Sequence[Piece]:
    """The pieces of ``entry`` a reader of the box ``offsets`` + ``shape`` may need: for compact rows only the
    parts that intersect it (arithmetic), else the entry's pieces (the caller intersects each)."""
    ps = entry.pieces
    if isinstance(ps, SplitPieces):
        return ps.intersecting(offsets, shape)
    return ps


def _check_entries(m: Manifest, compact: Mapping[str, int] | None = None) -> None:
    """Writer side: the tensor rows a reader refuses (``ManifestError``), checked with the reader's rules —
    device names, shapes and element counts, every piece inside a listed file with exactly its box's bytes,
    the boxes of a tensor disjoint and covering it. ``O(pieces log pieces)``."""
    where = f"the manifest of step {m.step}"
    files = m.files
    for name in files:
        check_file_name(name)
    devices: set[str] = set()
    for key, t in m.tensors.items():
        if not isinstance(key, str):
            raise ManifestError(f"{where}: tensor key {key!r} is not a string")
        w = f"{where}: tensor {key!r}"
        if t.device not in devices:
            check_device(t.device, w)
            devices.add(t.device)
        shape = tuple(t.shape)
        numel = 1
        for x in shape:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_NUMEL:
                raise ManifestError(f"{w}: shape {list(shape)!r:.200} has a dimension outside 0..2**62")
            numel *= x
        if numel > MAX_NUMEL:
            raise ManifestError(f"{w}: more than 2**62 elements")
        itemsize = STORABLE_DTYPES[t.dtype].itemsize
        if isinstance(t.pieces, SplitPieces) or (compact and key in compact):
            continue  # built by the reader, or a compact row: boxes checked by _as_split, files by the layout
        boxes: list[_Box] = []
        for p in t.pieces:
            size = files.get(p.file)
            if size is None:
                raise ManifestError(f"{w}: piece refers to file {p.file!r} that the manifest does not list")
            if not 0 <= p.start <= p.end <= size:
                raise ManifestError(f"{w}: byte range [{p.start}, {p.end}] lies outside file {p.file!r} ({size} B)")
            if p.offsets is None:
                n = numel
                if n:
                    boxes.append(((0,) * len(shape), shape, n))
            else:
                bs = tuple(p.shape or ())
                if len(p.offsets) != len(shape) or len(bs) != len(shape):
                    raise ManifestError(f"{w}: piece box rank does not match the tensor's")
                if any(o < 0 or s < 0 or o + s > g for o, s, g in zip(p.offsets, bs, shape)):
                    raise ManifestError(f"{w}: piece box {list(p.offsets)}+{list(bs)} exceeds shape {list(shape)}")
                n = math.prod(bs)
                if n:
                    boxes.append((tuple(p.offsets), bs, n))
            if n * itemsize != p.end - p.start:
                raise ManifestError(f"{w}: piece byte range [{p.start}, {p.end}] does not match its box and dtype")
        if len(boxes) != 1 or boxes[0][2] != numel:
            check_cover(shape, numel, boxes, w)


# -- coverage ------------------------------------------------------------------------------------------------
#: Groups of boxes no axis-aligned cut separates are compared pairwise up to this size (ckptstore never writes
#: such layouts: its boxes are a grid of shards, each split along dim 0).
_PAIRWISE_MAX = 16


_Box = tuple[tuple[int, ...], tuple[int, ...], int]  # offsets, shape, element count (> 0)


def check_cover(shape: tuple[int, ...], numel: int, boxes: Sequence[_Box], where: str = "manifest") -> None:
    """``ManifestError`` unless ``boxes`` (``(offsets, shape, elements)``, each inside ``shape``, none empty) are
    disjoint and cover ``shape`` exactly.

    Disjoint boxes inside the tensor cover it exactly iff their volumes add up to its element count, so this
    checks the volumes, then disjointness by recursive guillotine cuts: sorted by start along one dimension, a
    sweep finds every cut that no box straddles and splits the boxes there, then each part is cut along the next
    dimension. Dim-0 chunks take one sweep, a grid of shards (each split along dim 0) two or three: about
    ``O(n log n)``. Layouts that need many nested cuts (a staircase) stop at a work budget of ``32 n`` box
    visits, and small groups no cut separates are compared pairwise: never ``O(n^2)``.
    """
    vol = sum(b[2] for b in boxes)
    if vol != numel:
        raise ManifestError(
            f"{where}: its pieces hold {vol} elements but the tensor has {numel}: pieces overlap or leave a gap"
        )
    if len(boxes) < 2:
        return
    ndim = len(shape)
    budget = 32 * len(boxes) + 1024
    work: list[tuple[list[_Box], int]] = [(list(boxes), 0)]
    while work:
        group, d0 = work.pop()
        parts: list[list[_Box]] = []
        for j in range(ndim):
            d = (d0 + j) % ndim
            budget -= len(group)
            if budget < 0:
                raise ManifestError(
                    f"{where}: its {len(boxes)} pieces form a layout too irregular to check (ckptstore never writes "
                    "one); the manifest is hostile or damaged"
                )
            group.sort(key=lambda b, d=d: b[0][d])  # type: ignore[misc]
            parts, cur = [], [group[0]]
            reach = group[0][0][d] + group[0][1][d]
            for b in group[1:]:
                start = b[0][d]
                if start >= reach:
                    parts.append(cur)
                    cur = [b]
                    reach = start + b[1][d]
                else:
                    cur.append(b)
                    reach = max(reach, start + b[1][d])
            parts.append(cur)
            if len(parts) > 1:
                work.extend((p, (d + 1) % ndim) for p in parts if len(p) > 1)
                break
        else:
            if len(group) > _PAIRWISE_MAX:
                raise ManifestError(f"{where}: pieces overlap (or form a layout ckptstore never writes)")
            budget -= len(group) ** 2
            for i, (oa, sa, _) in enumerate(group):
                for ob, sb, _ in group[i + 1 :]:
                    if all(a < b + t and b < a + s for a, s, b, t in zip(oa, sa, ob, sb)):
                        raise ManifestError(
                            f"{where}: pieces overlap (boxes {list(oa)}+{list(sa)}, {list(ob)}+{list(sb)})"
                        )
