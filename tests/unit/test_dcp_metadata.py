"""ckptstore._dcp_metadata: the allow-listed pickle machine that reads DCP ``.metadata`` without running code.

Legitimate indexes (as torch DCP writes them on this Python, in every pickle protocol, and in the enum-by-getattr
form of early Python 3.11 releases such as Debian 12's 3.11.2) load to the same Metadata as ``pickle.loads``.
Every way a pickle can reach code — dotted names, REDUCE/NEWOBJ/BUILD of things outside the allow-list, getattr
beyond enum members, INST/OBJ/EXT, container opcodes on foreign objects — is an ``UnsafeCheckpointError`` and
nothing runs (sentinel files, module and class attributes are checked untouched); damaged pickles are
``ManifestError``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from ckptstore._dcp_metadata import loads
from ckptstore.errors import CheckpointError, ManifestError, UnsafeCheckpointError
from tests.fixtures.dcp import MD, Asm, dcp_save, dump_enum_by_getattr


@pytest.fixture(scope="module")
def md_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("dcp") / "ck"
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(2, 3)).sum().backward()
    opt.step()
    state = {
        "model": lin.state_dict(),
        "optim": opt.state_dict(),
        "epoch": 3,
        "b": torch.zeros(2, dtype=torch.bfloat16),
    }
    dcp_save(state, d)
    return (d / ".metadata").read_bytes()


@pytest.mark.parametrize("form", ["as written", "proto2", "proto3", "proto5", "enum by getattr", "getattr proto2"])
def test_legitimate_metadata_loads_like_pickle(md_bytes: bytes, form: str) -> None:
    ref = pickle.loads(md_bytes)  # our own file: trusted here
    data = {
        "as written": md_bytes,
        "proto2": pickle.dumps(ref, protocol=2),
        "proto3": pickle.dumps(ref, protocol=3),
        "proto5": pickle.dumps(ref, protocol=5),
        "enum by getattr": dump_enum_by_getattr(ref),
        "getattr proto2": dump_enum_by_getattr(ref, protocol=2),
    }[form]
    if form.startswith("enum") or form.startswith("getattr"):
        assert b"getattr" in data and b"_MEM_FORMAT_ENCODING" in data
    md = loads(data)
    assert type(md) is type(ref)
    assert md == ref  # dataclass equality: every field, tensor properties, chunks, storage entries
    assert md.storage_meta == ref.storage_meta and md.planner_data == ref.planner_data


def _sentinel_cmd(tmp_path: Path) -> tuple[Path, str]:
    sentinel = tmp_path / "pwned"
    return sentinel, f"touch {sentinel}"


@pytest.mark.parametrize("proto", [2, 4, 5])
@pytest.mark.parametrize(
    "module,name",
    [
        (MD, "os.system"),  # the allowed module's own imports, through protocol 4's dotted names
        (MD, "torch.os.system"),
        ("torch", "os.system"),
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
    ],
)
def test_calls_outside_the_allow_list_never_run(tmp_path: Path, proto: int, module: str, name: str) -> None:
    sentinel, cmd = _sentinel_cmd(tmp_path)
    data = Asm(proto).glob(module, name).str(cmd).tuple1().reduce().stop()
    with pytest.raises(UnsafeCheckpointError, match=r"allow-list|dotted"):
        loads(data)
    assert not sentinel.exists()


@pytest.mark.parametrize("proto", [2, 4])
@pytest.mark.parametrize(
    "name",
    ["Enum", "dataclass", "field", "os", "torch", "StatefulT", "_MEM_FORMAT_ENCODING.__new__", "Metadata.__init__"],
)
def test_module_level_names_of_the_metadata_module_are_not_allowed(proto: int, name: str) -> None:
    # Only the metadata classes themselves: not the module's imports (os, torch, dataclass, Enum, ...).
    with pytest.raises(UnsafeCheckpointError):
        loads(Asm(proto).glob(MD, name).stop())


def test_build_cannot_patch_modules_or_classes() -> None:
    import torch.distributed.checkpoint.metadata as mdmod

    before = mdmod.Metadata.__dict__.get("version")
    # BUILD on a class object (Metadata itself) with a slot state: would set Metadata.version for the process.
    patch_class = Asm(2).glob(MD, "Metadata").none().empty_dict().str("version").str("pwned").raw(pickle.SETITEM)
    patch_class = patch_class.tuple2().build().stop()
    with pytest.raises(UnsafeCheckpointError):
        loads(patch_class)
    assert mdmod.Metadata.__dict__.get("version") == before
    # BUILD on a module object reached through the metadata module (protocol 2: GLOBAL, no dotted names).
    patch_module = Asm(2).glob(MD, "os").empty_dict().str("ckptstore_pwned").int(1).raw(pickle.SETITEM).build()
    with pytest.raises(UnsafeCheckpointError):
        loads(patch_module.stop())
    assert not hasattr(os, "ckptstore_pwned")


@pytest.mark.parametrize(
    "target,attr",
    [
        ("TensorProperties", "__init__"),
        ("TensorProperties", "__setstate__"),
        ("_MEM_FORMAT_ENCODING", "__class__"),
        ("_MEM_FORMAT_ENCODING", "_member_map_"),
        ("_MEM_FORMAT_ENCODING", "__init__"),
        ("_MEM_FORMAT_ENCODING", "TORCH_CONTIGUOUS_FORMAT.__class__"),
        ("_MEM_FORMAT_ENCODING", "mro"),
        ("Metadata", "__dict__"),
    ],
)
def test_getattr_only_answers_enum_members(target: str, attr: str) -> None:
    data = Asm(4).glob("builtins", "getattr").glob(MD, target).str(attr).tuple2().reduce().stop()
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        loads(data)


def test_getattr_chains_and_other_receivers_are_refused(tmp_path: Path) -> None:
    sentinel, cmd = _sentinel_cmd(tmp_path)
    # getattr(getattr(TensorProperties, "__init__"), "__globals__")["os"].system(cmd): refused at the first step.
    inner = Asm(4).glob("builtins", "getattr").glob("builtins", "getattr").glob(MD, "TensorProperties")
    inner = inner.str("__init__").tuple2().reduce().str("__globals__").tuple2().reduce()
    with pytest.raises(UnsafeCheckpointError):
        loads(inner.stop())
    # getattr on a torch dtype / the torch.Size class: not an allowed enum.
    for recv in (("torch", "float32"), ("torch", "Size")):
        with pytest.raises(UnsafeCheckpointError):
            loads(Asm(4).glob("builtins", "getattr").glob(*recv).str("__class__").tuple2().reduce().stop())
    # A member lookup that is fine, then used as a callable: members are not callable constructors.
    member = Asm(4).glob("builtins", "getattr").glob(MD, "_MEM_FORMAT_ENCODING").str("TORCH_CHANNELS_LAST")
    assert loads(member.tuple2().reduce().stop()).name == "TORCH_CHANNELS_LAST"
    with pytest.raises(UnsafeCheckpointError):
        loads(member.str(cmd).tuple1().reduce().stop())
    assert not sentinel.exists()


def test_allowed_constructors_check_their_arguments() -> None:
    # Enum functional API (creates a class), torch.Size of non-ints, _get_layout of an unknown name,
    # OrderedDict/set of a non-list, NEWOBJ with arguments or of a non-metadata class.
    cases = [
        Asm(4).glob(MD, "_MEM_FORMAT_ENCODING").str("X").str("a b").tuple2().reduce(),
        Asm(4).glob("torch", "Size").str("ab").tuple1().reduce(),
        Asm(4).glob("collections", "OrderedDict").str("ab").tuple1().reduce(),
        Asm(4).glob("builtins", "set").str("ab").tuple1().reduce(),
        Asm(4).glob("pathlib", "PosixPath").int(3).tuple1().reduce(),
        Asm(4).glob(MD, "Metadata").str("x").tuple1().newobj(),
        Asm(4).glob("torch", "Size").empty_tuple().newobj(),
        Asm(4).glob("collections", "OrderedDict").empty_tuple().newobj(),
    ]
    for asm in cases:
        with pytest.raises(UnsafeCheckpointError):
            loads(asm.stop())
    with pytest.raises(CheckpointError, match="layout"):
        loads(Asm(4).glob("torch.serialization", "_get_layout").str("torch.__class__").tuple1().reduce().stop())
    assert loads(Asm(4).glob("torch.serialization", "_get_layout").str("torch.strided").tuple1().reduce().stop()) is (
        torch.strided
    )


@pytest.mark.parametrize(
    "op",
    [
        pickle.INST + b"os\nsystem\n",
        pickle.OBJ,
        pickle.EXT1 + b"\x01",
        pickle.PERSID + b"x\n",
        pickle.BINPERSID,
        b"\x92",
        b"\x97",
        pickle.STRING + b"'x'\n",
    ],
)
def test_opcodes_dcp_never_writes_are_refused(op: bytes) -> None:
    data = Asm(4).raw(pickle.MARK).str("x").raw(op).stop()
    with pytest.raises(UnsafeCheckpointError, match="opcode"):
        loads(data)


def test_container_opcodes_only_on_plain_containers() -> None:
    # SETITEMS/APPENDS on an allowed class object or a dtype would call its __setitem__/extend.
    for target in (("collections", "OrderedDict"), ("torch", "float32"), (MD, "Metadata")):
        asm = Asm(4).glob(*target).raw(pickle.MARK).str("k").str("v").raw(pickle.SETITEMS)
        with pytest.raises(UnsafeCheckpointError):
            loads(asm.stop())
        asm = Asm(4).glob(*target).raw(pickle.MARK).str("k").raw(pickle.APPENDS)
        with pytest.raises(UnsafeCheckpointError):
            loads(asm.stop())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x04",
        b"garbage",
        b"\x80\x04N",
        b"\x80\x04NN.",
        b"\x80\x04h\x05.",
        b"\x80\x04(t" + b"u.",
        b"\x80\x04}(]]u.",
        b"\x80\x04\x8a\x01",
    ],
)
def test_damaged_pickles_are_manifest_errors(data: bytes) -> None:
    with pytest.raises(ManifestError):
        loads(data)
