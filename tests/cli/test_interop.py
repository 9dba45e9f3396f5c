"""ckptstore.interop in-process: DCP safety, diff arithmetic, selection, summaries (no subprocesses)."""

from __future__ import annotations

import datetime
import math
import pathlib
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager, PerRank, Pickled
from ckptstore.errors import CheckpointNotFoundError, UnsafeCheckpointError, UnsupportedValueError
from ckptstore.interop import (
    diff_steps,
    export_step,
    fix_optimizer_state_keys,
    leaf_values,
    load_external,
    max_abs_diff,
    select,
    summarize,
)


def _dcp_save(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_dcp_metadata_is_read_with_an_allow_list(tmp_path: Path) -> None:
    d = tmp_path / "dcp"
    _dcp_save({"w": torch.arange(6.0).reshape(2, 3), "n": 3}, d)
    state = load_external(d).state
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3)) and state["n"] == 3
    # A .metadata that runs code when unpickled is refused before anything runs.
    sentinel = tmp_path / "pwned"
    (d / ".metadata").write_bytes(pickle.dumps(_Evil(str(sentinel))))
    with pytest.raises(UnsafeCheckpointError, match="allow-list"):
        load_external(d)
    assert not sentinel.exists()


def test_dcp_paths_must_stay_inside_the_directory(tmp_path: Path) -> None:
    d = tmp_path / "dcp"
    _dcp_save({"w": torch.ones(3)}, d)
    with open(d / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own file: trusted here
    for info in md.storage_data.values():
        info.relative_path = "../outside.distcp"
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        load_external(d)


def test_dcp_pickled_values_need_trust(tmp_path: Path) -> None:
    d = tmp_path / "dcp"
    _dcp_save({"w": torch.ones(2), "when": datetime.date(2024, 1, 2)}, d)
    with pytest.raises(UnsafeCheckpointError, match="trusted"):
        load_external(d)
    assert load_external(d, trusted=True).state["when"] == datetime.date(2024, 1, 2)


def test_max_abs_diff_edge_cases() -> None:
    nan, inf = float("nan"), float("inf")
    assert max_abs_diff(torch.tensor([1.0, nan, inf]), torch.tensor([1.0, nan, inf])) == 0.0
    assert math.isnan(max_abs_diff(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])))
    assert max_abs_diff(torch.tensor([1, 5], dtype=torch.int64), torch.tensor([4, 5])) == 3.0
    assert max_abs_diff(torch.tensor([True, False]), torch.tensor([True, True])) == 1.0
    a = torch.randn(1000).bfloat16()
    assert max_abs_diff(a, a.float()) == 0.0
    assert max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0.0
    assert max_abs_diff(torch.tensor([1 + 1j]), torch.tensor([1 + 0j])) == pytest.approx(1.0)


def test_fix_optimizer_state_keys_and_select() -> None:
    sd = {"optim": {"state": {"0": {"m": 1}, "1": {"m": 2}}, "param_groups": [{"params": [0, 1], "lr": 0.1}]},
          "other": {"state": {"0": 1}}}  # fmt: skip
    fixed = fix_optimizer_state_keys(sd)
    assert list(fixed["optim"]["state"]) == [0, 1] and fixed["other"]["state"] == {"0": 1}
    assert select(fixed, "optim/param_groups/0/lr") == 0.1
    assert select(fixed, "optim/state/1/m") == 2  # int keys by their digits
    with pytest.raises(CheckpointNotFoundError, match="keys: optim, other"):
        select(fixed, "model")


def test_export_refusals(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"m": Pickled(torch.nn.Linear(2, 2)), "w": torch.ones(1)}, allow_pickle=True)
    with pytest.raises(UnsupportedValueError, match="safetensors"):
        export_step(mgr, 1, tmp_path / "x.safetensors", trusted=True)
    with pytest.raises(UnsafeCheckpointError):
        export_step(mgr, 1, tmp_path / "x.pt")
    with pytest.raises(UnsupportedValueError, match=r"\*\.pt"):
        export_step(mgr, 1, tmp_path / "x.bin")
    # trusted: written, and warned about (weights_only=True would refuse it)
    res = export_step(mgr, 1, tmp_path / "x.pt", trusted=True)
    assert res.step == 1 and (tmp_path / "x.pt").exists()
    assert not list(tmp_path.glob("x.pt.tmp-*"))


def test_summarize_and_diff_of_unusual_trees(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, torch.ones(3))  # a bare tensor as the whole state
    (sec,) = summarize(mgr.manifest(1))
    assert sec.name is None and sec.rows[0].entry is not None and sec.rows[0].entry.shape == (3,)
    mgr.save(2, {"rng": PerRank(torch.zeros(2)), "cfg": {"lr": 0.1, "betas": (0.9, 0.99), "dt": torch.float16}})
    secs = summarize(mgr.manifest(2))
    assert [s.name for s in secs] == ["rng", None]
    assert secs[0].rows[0].path == "[rank 0]"
    assert secs[1].rows[0].path == "cfg" and secs[1].rows[0].value["dt"] == torch.float16
    mgr.save(3, {"rng": PerRank(torch.ones(2)), "cfg": {"lr": 0.2, "betas": (0.9, 0.99), "dt": torch.float16}})
    d = diff_steps(mgr.storage, mgr.manifest(2), mgr.storage, mgr.manifest(3))
    assert [(t.key, t.status, t.max_abs_diff) for t in d.tensors] == [("rng/~rank0", "changed", 1.0)]
    assert [(v.path, v.a, v.b) for v in d.values] == [("cfg/lr", 0.1, 0.2)]
    assert leaf_values(mgr.manifest(3).tree)["cfg/betas/1"] == 0.99


def test_sharded_safetensors_index_is_merged(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ext = load_external(tmp_path / "model.safetensors.index.json")
    assert ext.format == "safetensors" and sorted(ext.state) == ["a.weight", "b.weight"]
    assert torch.equal(ext.state["a.weight"], torch.ones(2, 2))
    index["weight_map"]["c"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError):
        load_external(tmp_path / "model.safetensors.index.json")
