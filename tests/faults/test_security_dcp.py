"""Security rows for foreign checkpoints: a hostile torch.distributed.checkpoint directory never runs code.

``load_external`` / ``import_external`` / ``ckptstore import`` on a DCP directory whose ``.metadata`` pickle is
forged (dotted names through the allowed module with protocol 4, GLOBAL + BUILD patching a module with protocol 2,
REDUCE of the metadata module's own imports, getattr beyond enum members) raise ``UnsafeCheckpointError``; the
sentinel file is never created and no module is patched. A damaged index (list indices that would allocate
without bound, tensors whose size the data files cannot back, data files outside the directory) is a
``ManifestError``/``UnsafeCheckpointError`` before any allocation. A real DCP checkpoint still imports, also in
the form early Python 3.11 releases (Debian 12's 3.11.2 ``/usr/bin/python3``) pickles enum members:
``builtins.getattr(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT")``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import ManifestError, UnsafeCheckpointError
from ckptstore.interop import import_external, load_external
from tests.fixtures.dcp import MD, Asm, dcp_save, dump_enum_by_getattr, rewrite_metadata

pytestmark = [pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": lin.state_dict(), "optim": opt.state_dict(), "epoch": 2, "seen": [1, 2]}


@pytest.fixture
def dcp_dir(tmp_path: Path) -> Path:
    return dcp_save(_state(), tmp_path / "dcp")


def _hostile(dcp_dir: Path, data: bytes) -> Path:
    (dcp_dir / ".metadata").write_bytes(data)
    return dcp_dir


def test_dotted_names_through_the_allowed_module_never_run(dcp_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    # Protocol 4 resolves "os.system" through torch.distributed.checkpoint.metadata, which imports os.
    data = Asm(4).glob(MD, "os.system").str(f"touch {sentinel}").tuple1().reduce().stop()
    with pytest.raises(UnsafeCheckpointError, match="dotted"):
        load_external(_hostile(dcp_dir, data))
    assert not sentinel.exists()
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    with pytest.raises(UnsafeCheckpointError):
        import_external(dcp_dir, mgr, step=1)
    assert not sentinel.exists() and mgr.steps() == []


def test_protocol2_global_and_build_cannot_patch_modules(dcp_dir: Path) -> None:
    # GLOBAL "torch.distributed.checkpoint.metadata os" is the os module; BUILD would update its __dict__.
    data = Asm(2).glob(MD, "os").raw(pickle.EMPTY_DICT).str("ckptstore_pwned").int(1).raw(pickle.SETITEM).build()
    try:
        with pytest.raises(UnsafeCheckpointError):
            load_external(_hostile(dcp_dir, data.stop()))
        assert not hasattr(os, "ckptstore_pwned")
    finally:
        os.__dict__.pop("ckptstore_pwned", None)
        os.__dict__.pop("storage_meta", None)


@pytest.mark.parametrize("proto", [2, 4])
def test_reduce_of_the_metadata_modules_imports_is_refused(dcp_dir: Path, proto: int) -> None:
    # The Enum functional API creates a class; dataclass() rewrites one: callables, but not constructors of data.
    data = Asm(proto).glob(MD, "Enum").str("X").str("a b").tuple2().reduce().stop()
    with pytest.raises(UnsafeCheckpointError):
        load_external(_hostile(dcp_dir, data))
    data = Asm(proto).glob(MD, "dataclass").glob(MD, "StorageMeta").tuple1().reduce().stop()
    with pytest.raises(UnsafeCheckpointError):
        load_external(_hostile(dcp_dir, data))


@pytest.mark.parametrize("attr", ["__init__", "__setstate__", "__class__"])
def test_getattr_beyond_enum_members_is_refused(dcp_dir: Path, attr: str) -> None:
    data = Asm(4).glob("builtins", "getattr").glob(MD, "TensorProperties").str(attr).tuple2().reduce().stop()
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        load_external(_hostile(dcp_dir, data))


def test_enum_members_pickled_by_getattr_import(dcp_dir: Path, tmp_path: Path) -> None:
    """The form of early Python 3.11 releases (Debian 12's 3.11.2): same state as the original."""
    want = load_external(dcp_dir).state
    md = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own file: trusted here
    data = dump_enum_by_getattr(md)
    assert b"getattr" in data
    got = load_external(_hostile(dcp_dir, data)).state
    assert got.keys() == want.keys() and got["epoch"] == 2 and got["seen"] == [1, 2]
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v)
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    import_external(dcp_dir, mgr, step=3)
    assert torch.equal(mgr.load(3)["model"]["weight"], want["model"]["weight"])


def test_planner_data_cannot_grow_lists_without_bound(dcp_dir: Path) -> None:
    # set_element() grows a list to the int in a path: ("seen", 10**7) would build a 10M-item list.
    def change(md: Any) -> None:
        md.planner_data["seen"] = ("seen", 10**7)

    rewrite_metadata(dcp_dir, change)
    with pytest.raises(ManifestError, match="planner_data"):
        load_external(dcp_dir)


def test_tensor_sizes_must_be_backed_by_data(dcp_dir: Path) -> None:
    # A 1 GiB tensor with no chunks: DCP would allocate it and hand back uninitialized memory.
    from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

    def change(md: Any) -> None:
        md.state_dict_metadata["huge"] = TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size([1 << 28]), []
        )

    rewrite_metadata(dcp_dir, change)
    with pytest.raises(ManifestError, match="data files hold"):
        load_external(dcp_dir)


def test_storage_entries_are_checked(dcp_dir: Path) -> None:
    def negative_offset(md: Any) -> None:
        for info in md.storage_data.values():
            info.offset = -5

    rewrite_metadata(dcp_dir, negative_offset)
    with pytest.raises(ManifestError, match="offset"):
        load_external(dcp_dir)


def _data_files(dcp_dir: Path) -> list[Path]:
    return sorted(dcp_dir.glob("*.distcp"))


def test_data_files_must_be_regular_files_inside_the_directory(dcp_dir: Path, tmp_path: Path) -> None:
    data = _data_files(dcp_dir)[0]
    private = tmp_path / "id_rsa"
    private.write_bytes(data.read_bytes())  # readable as DCP data, but not the directory's own file
    data.unlink()
    data.symlink_to(private)
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        load_external(dcp_dir)


@pytest.mark.timeout(60)
def test_a_fifo_as_data_file_does_not_hang(dcp_dir: Path) -> None:
    data = _data_files(dcp_dir)[0]
    data.unlink()
    os.mkfifo(data)  # no writer ever comes: opening it for reading would block
    with pytest.raises(ManifestError, match="not a regular file"):
        load_external(dcp_dir)


CLI_IMPORT = """
import sys
from ckptstore.cli import main
sys.exit(main(["import", sys.argv[1], sys.argv[2], "--step", "1"]))
"""


@pytest.mark.timeout(120)
def test_cli_import_of_a_hostile_dcp_directory(dcp_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    data = Asm(4).glob(MD, "os.system").str(f"touch {sentinel}").tuple1().reduce().stop()
    _hostile(dcp_dir, data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", CLI_IMPORT, str(dcp_dir), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=100, env=env, cwd=str(REPO))  # fmt: skip
    assert p.returncode == 4, p.stderr
    assert not sentinel.exists()
    line = p.stderr.strip()
    assert line.startswith("ckptstore import: refused:") and "internal error" not in line, line
    # The CLI names its own flag, not the Python parameter.
    assert "--trusted" in line and "trusted=True" not in line, line
