"""ckptstore.interop.load_external on hostile or damaged foreign files: typed errors only, no hang.

- torch files: text, empty, damaged pickles -> ``ManifestError`` (not a raw ``IndexError``, not "holds pickled
  objects"); a real pickled object -> ``UnsafeCheckpointError`` naming the refused global;
- safetensors: metadata trees nested past the recursion limit, FIFOs in place of files -> ``ManifestError``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from ckptstore.errors import ManifestError, UnsafeCheckpointError
from ckptstore.interop import TREE_META_KEY, load_external


def test_torch_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    cases = {
        "passwd.pt": b"root:x:0:0:root:/root:/bin/bash\n",
        "empty.pt": b"",
        "damaged.pt": b"\x80\x02" + bytes(range(256)) * 4,
        "zipjunk.pt": b"PK\x03\x04" + b"\x00" * 64,
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ManifestError) as ei:
            load_external(p)
        assert not isinstance(ei.value, UnsafeCheckpointError), name
    with pytest.raises(ManifestError, match="not a checkpoint"):
        load_external(tmp_path / "passwd.pt")
    with pytest.raises(ManifestError, match=r"damaged or not a torch\.save file"):
        load_external(tmp_path / "damaged.pt")


def test_a_pickled_object_is_refused_with_its_name(tmp_path: Path) -> None:
    p = tmp_path / "date.pt"
    torch.save({"when": datetime.date(2024, 1, 2)}, p)
    with pytest.raises(UnsafeCheckpointError, match=r"datetime\.date") as ei:
        load_external(p)
    assert "\x1b" not in str(ei.value) and "trusted=True" in str(ei.value)
    assert load_external(p, trusted=True).state["when"] == datetime.date(2024, 1, 2)


def test_safetensors_metadata_nested_too_deeply(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "deep.safetensors"
    deep = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on this
    save_file({"a": torch.ones(2)}, str(p), metadata={TREE_META_KEY: deep})
    with pytest.raises(ManifestError, match=TREE_META_KEY):
        load_external(p)
    # Valid JSON within json's own limit, but unflatten would recurse past Python's.
    tree = '{"t": "list", "v": [' * 450 + '{"t": "tensor", "key": "a"}' + "]}" * 450
    json.loads(tree)
    save_file({"a": torch.ones(2)}, str(p), metadata={TREE_META_KEY: tree})
    with pytest.raises(ManifestError):
        load_external(p)


@pytest.mark.timeout(60)
def test_fifos_instead_of_files(tmp_path: Path) -> None:
    for name in ("model.safetensors", "model.pt"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with pytest.raises(ManifestError, match="not a regular file"):
            load_external(fifo)
    shard = tmp_path / "shard-1.safetensors"
    os.mkfifo(shard)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard.name}}))
    with pytest.raises(ManifestError, match="not a regular file"):
        load_external(index)
