"""Forging manifests for hostile-input tests: edit the parsed JSON, then re-sign it.

``manifest_crc32c`` is a checksum, not a signature: anyone who can write a manifest can recompute it. Tests of
the structural and safety checks therefore forge manifests *with a valid checksum*, so they exercise the check
under test and not the integrity check in front of it.

Example::

    doc = json.loads(raw)
    doc["tensors"]["w"]["dtype"] = "quint4x2"
    storage_path.write_bytes(sign(doc))          # the layout ckptstore writes, valid crc32c
    storage_path.write_bytes(sign(doc, lines=False))   # one-line json.dumps spelling, valid crc32c
"""

from __future__ import annotations

import json
from typing import Any

import crc32c

CRC_FIELD = b',\n "manifest_crc32c":"'


def _enc(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=True)  # NaN stays a (refused) NaN literal


def body_of(doc: dict[str, Any], *, lines: bool = True) -> bytes:
    """The bytes a manifest's checksum covers, for ``doc`` (its ``manifest_crc32c`` is ignored)."""
    doc = {k: v for k, v in doc.items() if k != "manifest_crc32c"}
    if not lines:
        return json.dumps(doc)[:-1].encode()  # without the closing brace
    out = []
    for k, v in doc.items():
        if k == "tensors" and isinstance(v, dict) and v:
            rows = ",\n".join(f"  {_enc(tk)}:{_enc(tv)}" for tk, tv in v.items())
            out.append(' "tensors":{\n' + rows + "\n }")
        else:
            out.append(f" {_enc(k)}:{_enc(v)}")
    return ("{\n" + ",\n".join(out)).encode()


def sign_body(body: bytes) -> bytes:
    """``body`` plus the trailing ``manifest_crc32c`` field that makes it pass the integrity check."""
    return body + CRC_FIELD + f'{crc32c.crc32c(body):08x}"\n}}\n'.encode()


def sign(doc: dict[str, Any], *, lines: bool = True) -> bytes:
    """``doc`` serialised (in the layout ckptstore writes, or one line with ``lines=False``) with a valid
    self-checksum."""
    return sign_body(body_of(doc, lines=lines))


def resign(raw: bytes) -> bytes:
    """A manifest whose bytes were edited (before its checksum field) with the checksum recomputed."""
    idx = raw.rfind(CRC_FIELD)
    assert idx > 0, "not a ckptstore manifest"
    return sign_body(raw[:idx])


def flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    """``data`` with one bit flipped (bit rot, or a tamperer who did not bother to re-sign)."""
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)
