"""Inference artifacts (torch.export / TorchScript) beside a committed step, and entire-model pickles."""

from __future__ import annotations

import json
import pathlib
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ckptstore import CheckpointManager, Pickled
from ckptstore.artifacts import list_artifacts, load_artifact, save_artifact
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    ManifestError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from ckptstore.format.manifest import step_dir
from ckptstore.transfer import verify_step


class TheModelClass(nn.Module):
    """The tutorial's model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path: Path) -> str:
    if request.param == "file":
        return str(tmp_path / "ckpt")
    return f"memory://art-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def model() -> TheModelClass:
    torch.manual_seed(0)
    return TheModelClass().eval()


def _scripted(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        return torch.jit.script(model)


def test_exported_program_and_torchscript_round_trip(root: str, model: TheModelClass) -> None:
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    with CheckpointManager(root) as mgr:
        mgr.save(100, {"model": model}, epoch=1)
        ep = torch.export.export(model, (x,))
        info = mgr.save_artifact(100, "serving", ep)
        assert info.kind == "exported_program" and info.file == "artifact-serving.pt2" and info.size > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mgr.save_artifact(100, "scripted", _scripted(model))
        assert [a.name for a in mgr.artifacts(100)] == ["scripted", "serving"]
        names = set(mgr.storage.list_dir(step_dir(100)))
        assert {"artifact-serving.pt2", "artifact-serving.json", "artifact-scripted.ts"} <= names
        side = json.loads(mgr.storage.read_bytes(f"{step_dir(100)}/artifact-serving.json"))
        assert side["kind"] == "exported_program" and side["size"] == info.size and len(side["crc32c"]) == 8
        # The manifest is untouched: the step still loads and verifies, artifacts included.
        assert set(mgr.load(100)["model"]) == set(model.state_dict())
        assert verify_step(mgr, 100).ok and verify_step(mgr, 100).artifacts == 2

    # A fresh process-like manager loads them without the model class.
    with CheckpointManager(root) as mgr:
        prog = mgr.load_artifact(100, "serving")
        assert isinstance(prog, torch.export.ExportedProgram)
        torch.testing.assert_close(prog.module()(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ts = mgr.load_artifact(100, "scripted")
        torch.testing.assert_close(ts(x), expected)


def test_artifact_rules(tmp_path: Path, model: TheModelClass) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    ts = _scripted(model)
    with pytest.raises(CheckpointNotFoundError):
        mgr.save_artifact(7, "x", ts)  # artifacts attach to committed steps only
    mgr.save(7, {"w": torch.ones(1)})
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(UnsupportedValueError):
            mgr.save_artifact(7, bad, ts)
    with pytest.raises(UnsupportedValueError, match="ExportedProgram"):
        mgr.save_artifact(7, "plain", model)  # a plain nn.Module is weights (save) or a pickle (Pickled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mgr.save_artifact(7, "m", ts)
        with pytest.raises(CheckpointExistsError):
            mgr.save_artifact(7, "m", ts)  # immutable, like steps
    with pytest.raises(CheckpointNotFoundError, match="artifacts: m"):
        mgr.load_artifact(7, "nope")


def test_half_written_artifact_is_invisible_and_corruption_is_never_loaded(tmp_path: Path, model) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"w": torch.ones(1)})
    # A crash after the data file but before the sidecar: no artifact.
    mgr.storage.write_bytes(f"{step_dir(1)}/artifact-half.ts", b"partial")
    assert mgr.artifacts(1) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mgr.save_artifact(1, "m", _scripted(model))
    path = Path(mgr.storage.full(f"{step_dir(1)}/artifact-m.ts"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as ei:
        mgr.load_artifact(1, "m")
    assert ei.value.step == 1 and ei.value.file == "artifact-m.ts" and ei.value.key == "artifact:m"
    (p,) = verify_step(mgr, 1).problems
    assert p.key == "artifact:m" and p.file == "artifact-m.ts"


def test_hostile_sidecar_is_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"w": torch.ones(1)})
    doc = {"format": "ckptstore-artifact", "format_version": 1, "name": "x", "kind": "torchscript",
           "file": "../../etc/passwd", "size": 3, "crc32c": "00000000"}  # fmt: skip
    mgr.storage.write_bytes(f"{step_dir(1)}/artifact-x.json", json.dumps(doc).encode())
    with pytest.raises(ManifestError, match="data file must be"):
        load_artifact(mgr.storage, 1, "x")
    with pytest.raises(ManifestError):
        list_artifacts(mgr.storage, 1)
    assert not verify_step(mgr, 1).ok


def test_save_artifact_function_on_storage(tmp_path: Path, model) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(3, {"w": torch.ones(1)})
    ep = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    info = save_artifact(mgr.storage, 3, "ep", ep)
    assert info.to_dict()["crc32c"] == f"{info.crc32c:08x}"
    assert isinstance(load_artifact(mgr.storage, 3, "ep"), torch.export.ExportedProgram)


# -- entire-model pickles (the tutorial's torch.save(model)) ------------------------------------------------------
class _Evil:
    """Unpickling this would create the sentinel file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_entire_model_pickle_round_trips_only_when_trusted(root: str, model: TheModelClass, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"model": Pickled(model), "epoch": 3}, allow_pickle=True)
        mgr.save(2, {"evil": _Evil(str(sentinel)), "w": torch.ones(2)}, allow_pickle=True)
    with CheckpointManager(root) as mgr:
        back = mgr.load(1, trusted=True)
        assert isinstance(back["model"], TheModelClass) and back["epoch"] == 3
        for k, v in model.state_dict().items():
            assert torch.equal(back["model"].state_dict()[k], v)
        with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
            mgr.load(1)
        for call in (lambda: mgr.load(2), lambda: mgr.restore({"w": torch.zeros(2)}, step=2)):
            with pytest.raises(UnsafeCheckpointError):
                call()
        # Verification reads every byte and checks checksums without unpickling anything.
        assert verify_step(mgr, 2).ok
        assert not sentinel.exists()


def test_gc_keeps_committed_artifacts(tmp_path: Path, model) -> None:
    mgr = CheckpointManager(str(tmp_path / "c"))
    mgr.save(1, {"w": torch.ones(1)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mgr.save_artifact(1, "m", _scripted(model))
    mgr.storage.write_bytes(f"{step_dir(1)}/artifact-half.ts", b"partial")  # no sidecar: garbage
    removed = mgr.gc(min_age_seconds=0)
    assert removed == [f"{step_dir(1)}/artifact-half.ts"]
    assert [a.name for a in mgr.artifacts(1)] == ["m"]
