"""crc32c (Castagnoli) and combining checksums of concatenated byte strings, without the bytes.

The format layer needs them to write a manifest whose checksums cover *groups* of consecutive parts of a shard
file (format 2 layout lines with a group size ``k``): the writer holds one crc32c per part and combines them,
never re-reading data. :mod:`ckptstore.io` re-exports :func:`crc32c` and :func:`crc32c_combine`.

``crc32c(A + B) == crc32c_combine(crc32c(A), crc32c(B), len(B))``. The combine multiplies ``crc32c(A)`` by
``x^(8 len(B))`` modulo the CRC polynomial (zlib's ``crc32_combine``), a linear map of 32-bit values. That map
is memoized per distinct ``len(B)`` as four 256-entry tables (lengths repeat: every part of one tensor has the
same size), so one combine costs four table look-ups instead of a 32-step carry-less multiplication.
"""

from __future__ import annotations

from collections.abc import Sequence

import crc32c as _crc

CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def crc32c(buf: memoryview | bytes | bytearray, value: int = 0) -> int:
    """crc32c of ``buf`` continuing from ``value``; releases the GIL on large buffers (threads checksum in
    parallel)."""
    return int(_crc.crc32c(buf, value))


def _gf2_mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC-32C polynomial (bit-reflected), as in zlib's multmodp."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ CRC32C_POLY if b & 1 else b >> 1


def _x_pow_2n_table() -> list[int]:
    p = 1 << 30  # x^1
    table = [p]
    for _ in range(1, 64):
        p = _gf2_mulmod(p, p)
        table.append(p)
    return table


_X2N = _x_pow_2n_table()


def _x_pow_8n(n: int) -> int:
    """x^(8 n) modulo the polynomial (reflected)."""
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _gf2_mulmod(_X2N[k & 63], p)
        n >>= 1
        k += 1
    return p


_Tables = tuple[list[int], list[int], list[int], list[int]]
_TABLES: dict[int, _Tables] = {}
_MAX_TABLES = 512  # ~40 KiB each; the memo is emptied when full (hostile or unusual inputs: many lengths)


def _shift_tables(n: int) -> _Tables:
    """The map ``c -> c * x^(8 n) mod P`` as four byte tables: ``T0[c & 255] ^ T1[c >> 8 & 255] ^ ...``."""
    got = _TABLES.get(n)
    if got is not None:
        return got
    # Images of the 32 basis bits: bit 31 is x^0 (reflected), so bit i is x^(31 - i); bit i-1 = bit i times x.
    e = [0] * 32
    v = _x_pow_8n(n)
    for i in range(31, -1, -1):
        e[i] = v
        v = (v >> 1) ^ CRC32C_POLY if v & 1 else v >> 1
    tabs = []
    for j in range(4):
        t = [0] * 256
        base = 8 * j
        for b in range(1, 256):
            low = (b & -b).bit_length() - 1
            t[b] = t[b & (b - 1)] ^ e[base + low]
        tabs.append(t)
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.clear()
    out = (tabs[0], tabs[1], tabs[2], tabs[3])
    _TABLES[n] = out
    return out


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32c of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)`` (zlib's crc32_combine, Castagnoli)."""
    if not crc1 or not len2:
        return crc2 if len2 else crc1 ^ crc2  # crc32c(b"") == 0
    t0, t1, t2, t3 = _shift_tables(len2)
    return t0[crc1 & 255] ^ t1[(crc1 >> 8) & 255] ^ t2[(crc1 >> 16) & 255] ^ t3[crc1 >> 24] ^ crc2


def crc32c_groups(crcs: Sequence[int], lens: Sequence[int], k: int) -> list[int]:
    """The crc32c of each group of ``k`` consecutive byte strings (the last group may be shorter), given each
    string's crc32c and length: ``ceil(len(crcs) / k)`` values, ``O(len(crcs))`` table look-ups."""
    out: list[int] = []
    n = len(crcs)
    last = -1
    t0 = t1 = t2 = t3 = _shift_tables(1)
    for g in range(0, n, k):
        c = crcs[g]
        for j in range(g + 1, min(g + k, n)):
            ln = lens[j]
            if ln != last:
                if ln:
                    t0, t1, t2, t3 = _shift_tables(ln)
                last = ln
            if ln:
                c = t0[c & 255] ^ t1[(c >> 8) & 255] ^ t2[(c >> 16) & 255] ^ t3[c >> 24] ^ crcs[j]
            else:
                c ^= crcs[j]  # an empty string's crc is 0: nothing changes
        out.append(c)
    return out
