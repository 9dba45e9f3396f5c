"""Format layer: golden bytes for the shard header and the manifest, and defensive parsing."""

from __future__ import annotations

import json
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
    assert _golden_manifest().to_bytes() == (GOLDEN / "manifest_v1.json").read_bytes()


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
