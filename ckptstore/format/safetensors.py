"""Safetensors shard headers: build them for streaming writes and parse them defensively.

A shard file is ``u64-LE header length | JSON header (space-padded to 8 bytes) | raw little-endian data``,
exactly the layout ``safetensors.safe_open`` reads. Data offsets in the header are relative to the start of
the data section; the manifest stores absolute file offsets so restores never need the header.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ManifestError

#: torch dtype -> safetensors dtype tag. Dtypes missing here are stored as raw ``U8`` bytes (the manifest keeps
#: the real dtype and shape).
TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

#: Largest header we accept when parsing (safetensors itself refuses > 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def st_dtype_and_shape(dtype: torch.dtype, shape: Sequence[int], nbytes: int) -> tuple[str, list[int]]:
    """The (safetensors dtype, shape) used to store a tensor: native when possible, else raw bytes."""
    tag = TORCH_TO_ST.get(dtype)
    if tag is None:
        return "U8", [nbytes]
    return tag, [int(s) for s in shape]


def build_header(entries: Sequence[HeaderEntry], metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """Serialise a header for ``entries`` laid out back to back in order.

    Returns ``(prefix, data_start)`` where ``prefix`` is the 8-byte length plus the padded JSON and
    ``data_start == len(prefix)`` is the absolute file offset of the first data byte.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for e in entries:
        if e.name in header or e.name == "__metadata__":
            raise ManifestError(f"duplicate tensor name {e.name!r} in one shard")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    if len(raw) > MAX_HEADER_BYTES:  # the limit parse_header (and safetensors) applies: never write what they refuse
        raise ManifestError(
            f"a shard header of {len(entries)} tensors would be {len(raw)} bytes, more than the {MAX_HEADER_BYTES} "
            "readers accept (ckptstore.format.safetensors.MAX_HEADER_BYTES); save fewer, larger tensors or use "
            "smaller shard files (IOOptions.file_bytes)"
        )
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw)


def parse_header(prefix: bytes, file_size: int) -> tuple[dict[str, HeaderEntry], dict[str, str], int]:
    """Validate and parse a shard header. ``prefix`` must hold at least the first ``8 + header_len`` bytes.

    Returns ``(entries by name, metadata, data_start)``. Any inconsistency — huge length, bad JSON, unknown
    dtype, offsets outside the file, overlaps, holes, shape/size mismatch — raises ``ManifestError``.
    """
    if len(prefix) < 8 or file_size < 8:
        raise ManifestError("shard file is shorter than its 8-byte header length")
    (hlen,) = struct.unpack("<Q", prefix[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > file_size:
        raise ManifestError(f"shard header length {hlen} is larger than allowed or than the file ({file_size} B)")
    if len(prefix) < 8 + hlen:
        raise ManifestError("shard header is truncated")
    try:
        obj = json.loads(prefix[8 : 8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: hostile nesting
        raise ManifestError(f"shard header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ManifestError("shard header must be a JSON object")
    data_start = 8 + hlen
    data_len = file_size - data_start
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ManifestError("shard __metadata__ must map strings to strings")
    entries: dict[str, HeaderEntry] = {}
    spans = []
    for name, e in obj.items():
        if not isinstance(e, dict):
            raise ManifestError(f"shard entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in ST_ITEMSIZE:
            raise ManifestError(f"shard entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s < 2**62 for s in shape):
            raise ManifestError(f"shard entry {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise ManifestError(f"shard entry {name!r} has data_offsets {offs!r} outside the file")
        numel = 1
        for s in shape:
            numel *= s
            if numel > data_len:  # stops shape-overflow tricks before they multiply further
                break
        if numel * ST_ITEMSIZE[dtype] != offs[1] - offs[0]:
            raise ManifestError(f"shard entry {name!r}: shape {shape} x {dtype} does not match its byte range")
        entries[name] = HeaderEntry(name, dtype, tuple(shape), offs[1] - offs[0])
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            raise ManifestError(f"shard data of {name!r} overlaps or leaves a hole (starts at {start}, expected {pos})")
        pos = end
    if pos != data_len:
        raise ManifestError(f"shard data section has {data_len - pos} trailing bytes not covered by any tensor")
    return entries, meta, data_start
