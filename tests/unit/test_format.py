"""Format layer: golden bytes for the shard header and the manifest, and defensive parsing."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptstore.errors import ManifestError, UnsafeCheckpointError
from ckptstore.format.manifest import Manifest, Piece, TensorEntry, parse_step_dir, step_dir
from ckptstore.format.safetensors import HeaderEntry, build_header, parse_header
from tests.faults.forge import sign

GOLDEN = Path(__file__).parent / "golden"


def _golden_manifest() -> Manifest:
    return Manifest(
        step=7,
        tree={"t": "dict", "k": ["w", "n"], "v": [{"t": "tensor", "key": "w"}, 3]},
        tensors={
            "w": TensorEntry("float32", (2,), (Piece("shard-00000000-r0-0.safetensors", 80, 88, 0x1234ABCD),), "cpu")
        },
        files={"shard-00000000-r0-0.safetensors": 88},
        epoch=1,
        metrics={"loss": float("nan")},
        metadata={"git": "abc"},
        created_at=1700000000.5,
        world_size=1,
        save_id="00000000",
        versions={"ckptstore": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
    )


def test_shard_header_golden_bytes() -> None:
    head, start = build_header(
        [HeaderEntry("a", "F32", (2,), 8), HeaderEntry("b#1,0", "I64", (1, 2), 16)], {"format": "pt"}
    )
    expected = (
        b"\x98\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b#1,0":{"dtype":"I64","shape":[1,2],"data_offsets":[8,24]}}       '
    )
    assert head == expected
    assert start == len(expected) == 160
    assert start % 8 == 0  # data section aligned like safetensors does


def test_shard_header_is_readable_by_safetensors(tmp_path: Path) -> None:
    a = torch.tensor([1.5, -2.0])
    b = torch.tensor([[7, 8]], dtype=torch.int64)
    head, _ = build_header([HeaderEntry("a", "F32", (2,), 8), HeaderEntry("b", "I64", (1, 2), 16)], {"format": "pt"})
    f = tmp_path / "x.safetensors"
    f.write_bytes(head + a.numpy().tobytes() + b.numpy().tobytes())
    with safe_open(str(f), framework="pt") as sf:
        assert torch.equal(sf.get_tensor("a"), a)
        assert torch.equal(sf.get_tensor("b"), b)
    entries, meta, data_start = parse_header(f.read_bytes(), f.stat().st_size)
    assert meta == {"format": "pt"} and data_start == len(head)
    assert entries["b"].shape == (1, 2) and entries["b"].nbytes == 16


def test_manifest_golden_bytes() -> None:
    # Format 1 is still what a manifest read from a format-1 file encodes to (byte for byte).
    v1 = dataclasses.replace(_golden_manifest(), format_version=1)
    assert v1.to_bytes() == (GOLDEN / "manifest_v1.json").read_bytes()
    assert Manifest.from_bytes(v1.to_bytes()).format_version == 1


def test_manifest_round_trip_and_strict_json() -> None:
    raw = (GOLDEN / "manifest_v1.json").read_bytes()
    doc = json.loads(raw)  # strict JSON: no NaN literal
    assert doc["format_version"] == 1 and doc["metrics"]["loss"] == {"$float": "nan"}
    m = Manifest.from_bytes(raw)
    assert m.step == 7 and m.epoch == 1 and m.nbytes == 8
    assert m.tensors["w"].pieces[0].crc32c == 0x1234ABCD
    assert m.to_bytes() == raw


def test_step_dir_sorts_as_integers() -> None:
    assert step_dir(1200) == "step-000000001200"
    names = sorted(step_dir(s) for s in [9, 10, 100, 2])
    assert [parse_step_dir(n) for n in names] == [2, 9, 10, 100]
    assert parse_step_dir("step-12") is None and parse_step_dir("other") is None
    with pytest.raises(ValueError):
        step_dir(-1)


def _doc() -> dict:
    return json.loads((GOLDEN / "manifest_v1.json").read_bytes())


@pytest.mark.parametrize(
    "mutate, err",
    [
        (lambda d: d.update(format_version=99), "newer ckptstore"),
        (lambda d: d.pop("step"), "missing field 'step'"),
        (lambda d: d.update(format="other"), "not a ckptstore manifest"),
        (lambda d: d["tensors"]["w"].update(dtype="not_a_dtype"), "unknown dtype"),
        (lambda d: d["tensors"]["w"].update(dtype="load"), "unknown dtype"),
        (lambda d: d["tensors"]["w"]["pieces"][0].update(range=[80, 1 << 40]), "outside file"),
        (lambda d: d["tensors"]["w"]["pieces"][0].update(range=[80, 84]), "does not match its shape"),
        (lambda d: d["tensors"]["w"]["pieces"][0].update(file="other.safetensors"), "does not list"),
        (lambda d: d["tensors"]["w"].update(shape=[-1]), "non-negative"),
        (lambda d: d.update(tree=None) or d.pop("tree"), "missing field 'tree'"),
    ],
)
@pytest.mark.parametrize("lines", [True, False], ids=["line-layout", "one-line"])
def test_manifest_validation_errors(mutate, err: str, lines: bool) -> None:
    d = _doc()
    mutate(d)
    with pytest.raises(ManifestError, match=err):
        Manifest.from_bytes(sign(d, lines=lines))


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "s3://other/x", "a/../../b", "..", "a\\b"])
def test_manifest_path_escape_is_refused(name: str) -> None:
    d = _doc()
    d["files"] = {name: 88}
    d["tensors"]["w"]["pieces"][0]["file"] = name
    for lines in (True, False):
        with pytest.raises(UnsafeCheckpointError):  # a valid checksum: hostile, not damaged
            Manifest.from_bytes(sign(d, lines=lines))


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"\x00\xff garbage", b"[]", b'{"format":"ckptstore","format_version":1,"step":NaN}', b"null"],
)
def test_garbage_manifest_is_a_manifest_error(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw)


def test_oversized_manifest_refused_before_parsing(monkeypatch) -> None:
    import ckptstore.format.manifest as mf

    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ManifestError, match="larger than"):
        Manifest.from_bytes(b" " * 101)


def _hdr(obj: dict, data_len: int) -> tuple[bytes, int]:
    raw = json.dumps(obj).encode()
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * data_len
    return blob, len(blob)


@pytest.mark.parametrize(
    "obj, data_len, err",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, 8, "does not match"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "outside the file"),
        ({"a": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, "trailing bytes"),
    ],
)  # fmt: skip
def test_hostile_safetensors_headers(obj: dict, data_len: int, err: str) -> None:
    blob, size = _hdr(obj, data_len)
    with pytest.raises(ManifestError, match=err):
        parse_header(blob, size)


def test_huge_header_length_is_refused_without_allocating() -> None:
    blob = struct.pack("<Q", 2**62) + b"{}"
    with pytest.raises(ManifestError, match="larger than allowed"):
        parse_header(blob, 1 << 50)


@pytest.mark.parametrize(
    "key",
    ["model/fc1.weight", 'q"uote', "back\\slash", "new\nline", "tab\t", "ünï", "emoji🙂", "", "a/b#0,3"],
)
def test_fast_tensor_rows_equal_the_json_encoder(key: str) -> None:
    # The manifest writes tensor rows with string templates; they must be byte-identical to json's encoding.
    from ckptstore.format.manifest import _ENCODER, _json_str, _tensor_json

    entries = [
        TensorEntry("float32", (4, 3), (Piece("shard-a-r0-0.safetensors", 80, 128, 0x1A2B3C4D),)),
        TensorEntry(
            "bfloat16",
            (),
            (Piece("shard-a-r1-2.safetensors", 8, 10, 0, offsets=(), shape=()),),
            device="cuda:1",
        ),
        TensorEntry(
            "uint8",
            (10, 2),
            (Piece("f", 0, 10, 0xFFFFFFFF, (0, 0), (5, 2)), Piece(key or "g", 10, 20, 7, (5, 0), (5, 2))),
            device=key,
            encoding="pickle",
        ),
    ]
    assert _json_str(key) == _ENCODER.encode(key)
    for e in entries:
        assert _tensor_json(e) == _ENCODER.encode(e.to_json())


# -- hostile-input hardening (issue 14) ----------------------------------------------------------------------
# Every forged manifest below carries a valid self-checksum (crc32c is not a MAC), so each test exercises the
# check it names and not the integrity check in front of it.
QUANTIZED = ["qint8", "quint8", "qint32", "quint4x2", "quint2x4"]


def _one_tensor_doc(dtype: str, shape: list[int], pieces: list[dict], file_size: int = 1 << 20) -> dict:
    d = _doc()
    d["files"] = {"f.safetensors": file_size}
    d["tensors"] = {"w": {"dtype": dtype, "shape": shape, "device": "cpu", "pieces": pieces}}
    return d


def _p(start: int, end: int, offsets: list[int] | None = None, shape: list[int] | None = None) -> dict:
    p: dict = {"file": "f.safetensors", "range": [start, end], "crc32c": "00000000"}
    if offsets is not None:
        p.update(offsets=offsets, shape=shape)
    return p


@pytest.mark.parametrize("lines", [True, False], ids=["line-layout", "one-line"])
@pytest.mark.parametrize("dtype", [*QUANTIZED, "float", "half", "long", "torch.float32"])
def test_tensor_dtype_allow_list(dtype: str, lines: bool) -> None:
    # quint4x2/quint2x4 storage is smaller than numel bytes: a reader sizing its read from numel * itemsize wrote
    # past the allocation. Aliases are refused too: ckptstore writes str(dtype) without "torch.".
    d = _one_tensor_doc(dtype, [64], [_p(0, 64)])
    with pytest.raises(ManifestError, match=r"not one ckptstore stores|unknown dtype"):
        Manifest.from_bytes(sign(d, lines=lines))


@pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 is experimental, quantized deprecated
def test_every_storable_dtype_is_numel_times_itemsize_bytes() -> None:
    from ckptstore.format.state import STORABLE_DTYPE_NAMES, STORABLE_DTYPES

    assert set(STORABLE_DTYPES) <= set(STORABLE_DTYPE_NAMES) and "bfloat16" in STORABLE_DTYPES
    assert not set(QUANTIZED) & set(STORABLE_DTYPES)
    for name, dt in STORABLE_DTYPES.items():
        t = torch.empty(1000, dtype=torch.uint8).view(dt) if dt.itemsize == 1 else torch.empty(1000, dtype=dt)
        assert t.untyped_storage().nbytes() == t.numel() * dt.itemsize, name
        d = _one_tensor_doc(name, [10], [_p(0, 10 * dt.itemsize)])
        assert Manifest.from_bytes(sign(d)).tensors["w"].torch_dtype is dt


@pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 is experimental, quantized deprecated
def test_writer_refuses_dtypes_the_reader_refuses() -> None:
    from ckptstore.errors import UnsupportedValueError
    from ckptstore.format.manifest import dtype_name
    from ckptstore.format.state import flatten

    for name in QUANTIZED:
        with pytest.raises(UnsupportedValueError):
            dtype_name(getattr(torch, name))
        m = _golden_manifest()
        m.tensors["w"] = TensorEntry(name, (8,), (Piece("shard-00000000-r0-0.safetensors", 80, 88, 0),))
        with pytest.raises(UnsupportedValueError, match="cannot be stored"):
            m.to_bytes()
    q = torch.quantize_per_tensor(torch.randn(8), 0.1, 0, torch.quint4x2)
    with pytest.raises(UnsupportedValueError, match="quint4x2"):
        flatten({"q": q})
    assert flatten({"q": q}, allow_pickle=True).pickles  # stored whole, as a trusted-only pickle


@pytest.mark.parametrize(
    "dtype, shape, pieces, encoding, err",
    [
        # a pickle's bytes were never checked against its shape
        ("uint8", [16], [_p(0, 32)], "pickle", "does not match its shape"),
        ("float32", [4], [_p(0, 16)], "pickle", "1-D uint8"),
        # box pieces: bytes of the box, not of the tensor
        ("float32", [4, 2], [_p(0, 16, [0, 0], [2, 2]), _p(16, 40, [2, 0], [2, 2])], "raw", "does not match"),
        # a range past 2**63 and a dimension past 2**62
        ("uint8", [4], [_p(0, 1 << 64)], "raw", "invalid byte range|outside file|must be"),
        ("uint8", [0, 1 << 63], [_p(0, 0)], "raw", "larger than 2\\*\\*62|non-negative integers"),
    ],
)
def test_piece_bytes_are_exactly_the_box(dtype: str, shape: list, pieces: list, encoding: str, err: str) -> None:
    d = _one_tensor_doc(dtype, shape, pieces)
    if encoding != "raw":
        d["tensors"]["w"]["encoding"] = encoding
        d["tree"]["v"][0] = {"t": "pickle", "key": "w", "cls": "x.Y"}
    for lines in (True, False):
        with pytest.raises(ManifestError, match=err):
            Manifest.from_bytes(sign(d, lines=lines))


@pytest.mark.parametrize(
    "shape, pieces, err",
    [
        ([4, 2], [], "hold 0 elements but the tensor has 8"),
        ([4, 2], [_p(0, 32), _p(32, 64)], "hold 16 elements"),  # the whole tensor twice
        ([4, 2], [_p(0, 16, [0, 0], [2, 2])], "hold 4 elements"),  # a gap
        # volumes add up, but two boxes overlap (rows 1-2) and row 3 is missing
        ([4, 2], [_p(0, 24, [0, 0], [3, 2]), _p(24, 32, [1, 0], [1, 2])], "overlap"),
        ([4, 2], [_p(0, 16, [0, 0], [2, 2]), _p(16, 32, [0, 0], [2, 2])], "overlap"),
        ([], [_p(0, 4), _p(4, 8, [], [])], "hold 2 elements"),  # a scalar held twice
    ],
)
def test_pieces_must_cover_the_tensor_exactly(shape: list, pieces: list, err: str) -> None:
    d = _one_tensor_doc("float32", shape, pieces)
    for lines in (True, False):
        with pytest.raises(ManifestError, match=err):
            Manifest.from_bytes(sign(d, lines=lines))


def test_empty_tensors_may_have_no_pieces_and_grids_are_accepted() -> None:
    # What save writes for an empty tensor (one 0-byte piece), no piece at all, and a 2 x 3 grid given in a
    # shuffled order: all accepted.
    grid = [_p(0, 0, [r * 2, c], [2, 1]) for r in range(2) for c in range(3)]
    for i, g in enumerate(reversed(grid)):
        g["range"] = [i * 8, i * 8 + 8]
    for shape, pieces in [([0], [_p(5, 5)]), ([3, 0], []), ([4, 3], grid)]:
        m = Manifest.from_bytes(sign(_one_tensor_doc("float32", shape, pieces)))
        assert m.tensors["w"].shape == tuple(shape) and len(m.tensors["w"].pieces) == len(pieces)


def _cover(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    from ckptstore.format.manifest import check_cover

    check_cover(shape, math.prod(shape), [(o, s, math.prod(s)) for o, s in boxes])


def test_cover_check_is_fast_on_big_layouts_and_bounded_on_hostile_ones() -> None:
    import random
    import time

    rng = random.Random(3)
    n = 40_000
    chunks = [((i, 0), (1, 7)) for i in range(n)]  # dim-0 chunks
    grid = [((r, c), (1, 1)) for r in range(200) for c in range(200)]  # a regular 200 x 200 grid
    # uneven shards on a 2-D mesh, each split along dim 0 into a different number of chunks (not a grid)
    uneven = []
    for c0, cw in [(0, 3), (3, 5), (8, 1)]:
        rows = 0
        while rows < 900:
            r = min(900 - rows, rng.randint(1, 4))
            uneven.append(((rows, c0), (r, cw)))
            rows += r
    pinwheel = [((0, 0), (2, 1)), ((0, 1), (1, 2)), ((2, 0), (1, 2)), ((1, 2), (2, 1)), ((1, 1), (1, 1))]
    for shape, boxes in [((n, 7), chunks), ((200, 200), grid), ((900, 9), uneven), ((3, 3), pinwheel)]:
        rng.shuffle(boxes)
        t0 = time.perf_counter()
        _cover(shape, boxes)
        assert time.perf_counter() - t0 < 2.0, (shape, len(boxes))
    # A staircase (each cut peels one box, alternating dims) is a valid cover but needs n nested cuts: refused
    # within the work budget instead of taking O(n^2).
    stair, r, c = [], 0, 0
    while r < 3000 and c < 3000:
        stair.append(((r, c), (1, 3000 - c)))
        r += 1
        stair.append(((r, c), (3000 - r, 1)))
        c += 1
    stair.append(((r, c), (3000 - r, 3000 - c)))
    stair = [(o, s) for o, s in stair if math.prod(s)]
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match="too irregular"):
        _cover((3000, 3000), stair)
    assert time.perf_counter() - t0 < 5.0
    # Many boxes no cut separates (bricks of two interleaved grids): refused, not compared pairwise.
    bricks = [((i, 0), (1, 2)) for i in range(0, 2000, 2)] + [((i, 0), (2, 1)) for i in range(1, 1999, 2)]
    with pytest.raises(ManifestError):
        _cover((2000, 2), bricks)


def test_integrity_is_checked_before_safety() -> None:
    raw = (GOLDEN / "manifest_v1.json").read_bytes()
    name = b"shard-00000000-r0-0.safetensors"
    flipped = raw.replace(name, name.replace(b".", b"/"))  # one bit: '.' ^ 0x01 == '/'
    assert sum(a != b for a, b in zip(raw, flipped)) == 2  # in "files" and in the piece
    with pytest.raises(ManifestError, match="checksum mismatch"):  # damaged: "latest" falls back
        Manifest.from_bytes(flipped)
    from tests.faults.forge import resign

    with pytest.raises(UnsafeCheckpointError):  # forged with a valid checksum: refused loudly
        Manifest.from_bytes(resign(flipped))


@pytest.mark.parametrize(
    "name",
    ["step-0000000000005", "step-" + "\u0660" * 11 + "\u0665", "step-" + "\uff10" * 11 + "\uff15", "step-000000000005/",
     "step-000000000005\n", " step-000000000005", "step-" + "9" * 20, "step-00000000000x"],
)  # fmt: skip
def test_only_canonical_step_dir_names_are_steps(name: str) -> None:
    assert parse_step_dir(name) is None


def test_step_dir_names_round_trip() -> None:
    from ckptstore.format.manifest import MAX_STEP

    for n in [0, 5, 10**12 - 1, 10**12, 10**15 + 7, MAX_STEP]:
        assert parse_step_dir(step_dir(n)) == n
    for s in ["step-000000000005", "step-1000000000000", f"step-{MAX_STEP}"]:
        assert step_dir(parse_step_dir(s)) == s
    assert parse_step_dir(f"step-{MAX_STEP + 1}") is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("created_at", 10**400), ("created_at", 1e300), ("created_at", -1), ("created_at", True),
        ("step", 2**64), ("epoch", 10**30), ("world_size", True), ("world_size", 2**40), ("nbytes", "8"),
        ("files", {"shard-00000000-r0-0.safetensors": 10**30}), ("save_id", 12), ("versions", {"torch": [1]}),
    ],
)  # fmt: skip
def test_numeric_fields_are_validated(field: str, value: object) -> None:
    d = _doc()
    d[field] = value
    for lines in (True, False):
        with pytest.raises(ManifestError):
            Manifest.from_bytes(sign(d, lines=lines))


def test_created_at_overflow_and_odd_metrics_parse_typed() -> None:
    d = _doc()
    body = sign(d).replace(b'"created_at":1700000000.5', b'"created_at":1e400')  # parses as inf
    from tests.faults.forge import resign

    with pytest.raises(ManifestError, match="created_at"):
        Manifest.from_bytes(resign(body))
    # Metrics with huge ints, inf literals and tagged non-finite floats parse into ints and floats.
    d["metrics"] = {"loss": 10**400, "acc": {"$float": "-inf"}}
    m = Manifest.from_bytes(resign(sign(d).replace(b'"acc"', b'"big":1e999,"acc"')))
    assert m.metrics["loss"] == 10**400 and m.metrics["big"] == math.inf and m.metrics["acc"] == -math.inf


def test_writer_refuses_header_values_and_sizes_the_reader_refuses(monkeypatch) -> None:
    import dataclasses

    import ckptstore.format.manifest as mf
    from ckptstore.errors import UnsupportedValueError

    for kw in [dict(step=2**63), dict(epoch=2**64), dict(created_at=1e20), dict(created_at=math.nan)]:
        with pytest.raises(UnsupportedValueError):
            dataclasses.replace(_golden_manifest(), **kw).to_bytes()
    # JSON that would cost far more memory than its size (a million empty lists): the reader refuses it
    # before parsing, so the writer refuses to commit it.
    big = dataclasses.replace(_golden_manifest(), metadata={"x": [[]] * 1_000_000})
    with pytest.raises(ManifestError, match="memory"):
        big.to_bytes()
    monkeypatch.setattr(mf, "JSON_BUDGET_BYTES", 1 << 40)
    raw = big.to_bytes()
    monkeypatch.undo()
    with pytest.raises(ManifestError, match="memory"):
        Manifest.from_bytes(raw)
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ManifestError, match="larger than"):
        _golden_manifest().to_bytes()


def test_parse_memory_is_a_small_multiple_of_the_size() -> None:
    import gc
    import tracemalloc

    from benchmarks.manifest_parse import build

    data = build(4 << 20, 8, 16)  # ~8k tensors, every 8th in 16 dim-0 chunks
    gc.collect()
    tracemalloc.start()
    try:
        m = Manifest.from_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(m.tensors) > 5000
    assert peak < 4 * len(data), f"parse peak {peak / len(data):.1f}x the manifest size"


def test_row_spellings_parse_alike() -> None:
    # The compact row reader and the JSON fallback (any other spelling of a row) build the same manifest.
    from benchmarks.manifest_parse import build

    raw = build(64 << 10, 2, 4)
    m = Manifest.from_bytes(raw)
    doc = json.loads(raw)
    from tests.faults.forge import body_of, sign_body

    spaced = sign_body(body_of(doc).replace(b'":', b'": ').replace(b'],"', b'], "'))
    for other in (Manifest.from_bytes(sign(doc, lines=False)), Manifest.from_bytes(spaced)):
        assert other.tensors == m.tensors and other.tree == m.tree and other.files == m.files
    assert m.to_bytes() == raw


@pytest.mark.parametrize(
    "text",
    [
        b"[" + b"[]," * 50_000 + b"[]]",
        b"[" + b"{}," * 50_000 + b"{}]",
        b"{" + b",".join(b'"a%d":0' % i for i in range(50_000)) + b"}",
        b"[" + b",".join(b'{"k%d":%d}' % (i, i) for i in range(50_000)) + b"]",
        b"[" + b",".join(b'"ab%d"' % (i % 10) for i in range(50_000)) + b"]",
        b"[" + b",".join(b"%d" % (10**12 + i) for i in range(50_000)) + b"]",
        b"[" + b"1.5," * 50_000 + b"1.5]",
        b'["\\ud83d\\ude00' + b"a" * 200_000 + b'"]',
        b'["\\u0100' + b"a" * 200_000 + b'"]',
        '["\U0001f642'.encode() + b"a" * 200_000 + b'"]',
    ],
    ids=["[]", "{}", "keys", "1-key dicts", "strings", "ints", "floats", "astral escape", "bmp escape", "astral utf-8"],
)
def test_json_cost_is_an_upper_bound_of_the_parse(text: bytes) -> None:
    import gc
    import tracemalloc

    from ckptstore.format.manifest import json_cost

    gc.collect()
    tracemalloc.start()
    try:
        value = json.loads(str(memoryview(text), "utf-8"))  # what the reader does with a line
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value is not None and json_cost(text) >= peak, (json_cost(text) / len(text), peak / len(text))


def test_every_layout_the_planner_writes_passes_the_cover_check() -> None:
    # DTensor-like boxes (uneven shards of a 4 x 3 mesh, a replicated mesh dim, an empty trailing shard),
    # planned with small chunks so boxes are split along dim 0: the reader accepts every plan.
    from ckptstore.format.manifest import check_cover
    from ckptstore.options import IOOptions
    from ckptstore.plan import LocalSpec, plan_writes

    def split(n: int, parts: int) -> list[tuple[int, int]]:  # torch.chunk: ceil-sized, trailing may be empty
        per = -(-n // parts)
        return [(min(i * per, n), max(0, min(per, n - i * per))) for i in range(parts)]

    shape = (101, 37)
    per_rank: list[list[LocalSpec]] = []
    for r0, rn in split(shape[0], 4):  # 4 x 3 mesh: dim 0 over 4 ranks, dim 1 over 3 + an empty shard
        for c0, cn in [*split(shape[1], 3), (37, 0)]:
            for _replica in range(2):
                spec = LocalSpec("w", "float32", 4, shape, (r0, c0), (rn, cn), 0)
                per_rank.append([spec, LocalSpec("b", "float32", 4, (5,), (0,), (5,), 1)])
    plan = plan_writes(per_rank, save_id="00000000", options=IOOptions(chunk_bytes=512, threads=2))
    boxes: dict[str, list] = {}
    for f in plan.files:
        for it in f.items:
            if math.prod(it.shape):
                boxes.setdefault(it.key, []).append((it.offsets, it.shape, math.prod(it.shape)))
    assert len(boxes["w"]) > 24  # split along dim 0 inside the uneven shards
    check_cover(shape, math.prod(shape), boxes["w"])
    check_cover((5,), 5, boxes["b"])
