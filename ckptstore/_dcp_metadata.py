"""Reading a torch.distributed.checkpoint ``.metadata`` file without trusting it.

DCP keeps its index as a plain pickle. ``pickle.load`` on a hostile one runs any code, and so does a restricted
``pickle.Unpickler.find_class``: protocol 4 resolves dotted names through the module it allows (for example
``torch.distributed.checkpoint.metadata`` + ``os.system``), ``REDUCE`` calls whatever callable reached the stack
and ``BUILD`` sets attributes on whatever object is there, classes included. So this module does not use the
unpickler at all: :func:`loads` runs its own small pickle machine (opcodes decoded as :mod:`pickletools`
documents them) and gives every operation that can run code an exact allow-list:

- ``GLOBAL``/``STACK_GLOBAL``: exact ``(module, name)`` pairs (no dotted names, nothing imported), resolving to
  the DCP metadata dataclasses, torch dtypes/layouts and a few data constructors;
- ``NEWOBJ``: only the DCP metadata dataclasses, without arguments (``cls.__new__(cls)``);
- ``REDUCE``: only the constructors below, each with its argument shape checked, and implemented here rather than
  called through (``torch.Size(ints)``, ``OrderedDict(pairs)``, ``set(items)``, paths from strings, the layout
  lookup ``torch.serialization._get_layout(name)``, the enum member lookups ``_MEM_FORMAT_ENCODING(value)`` and —
  the form early Python 3.11 releases (Debian 12's 3.11.2 ``/usr/bin/python3``) write enum members in —
  ``builtins.getattr(_MEM_FORMAT_ENCODING, "MEMBER")``, answered from the enum's ``__members__`` only: ``getattr``
  is never called, so ``getattr(cls, "__init__")`` and attribute chains are refused);
- ``BUILD``: only on instances of the DCP metadata dataclasses, with string attribute names that are not dunders
  (``TensorProperties`` gets its own ``__setstate__``);
- ``APPEND(S)``/``SETITEM(S)``/``ADDITEMS``: only on real lists, dicts/OrderedDicts, sets;
- ``INST``, ``OBJ``, ``NEWOBJ_EX``, ``EXT*``, persistent ids, out-of-band buffers and Python 2 strings: refused.

Anything refused raises :class:`~ckptstore.errors.UnsafeCheckpointError`; a malformed pickle raises
:class:`~ckptstore.errors.ManifestError`. :func:`check_metadata` then checks that the result has the shape the
DCP reader relies on (types, bounds, paths inside the directory, allocation sizes backed by data on disk).
"""

from __future__ import annotations

import _compat_pickle
import collections
import math
import os
import pathlib
import pickle
import struct
from collections.abc import Callable
from typing import Any

import torch

from .errors import CheckpointError, ManifestError, UnsafeCheckpointError

MAX_METADATA_BYTES = 1 << 30
"""Largest ``.metadata`` file read."""

_MD_MODULE = "torch.distributed.checkpoint.metadata"
_FS_MODULE = "torch.distributed.checkpoint.filesystem"
_MD_CLASSES = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
)
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
TRUST_REMEDY = "Pass {flag} if you trust who wrote it"


def needs_trust(cls: type[CheckpointError], what: str, remedy: str = TRUST_REMEDY) -> CheckpointError:
    """An error whose remedy is to trust the file. ``remedy`` names the switch as ``{flag}``: the message says
    ``trusted=True`` (the Python parameter) and the error's ``cli_message`` says ``--trusted`` (the CLI flag), which
    the CLI prints instead."""
    err = cls(f"{what}. {remedy.format(flag='trusted=True')}")
    err.cli_message = f"{what}. {remedy.format(flag='--trusted')}"  # type: ignore[attr-defined]
    return err


class _Refused(UnsafeCheckpointError):
    pass


class _Tables:
    """What the metadata pickle may name, resolved once from modules DCP has already imported."""

    def __init__(self) -> None:
        import torch.distributed.checkpoint.filesystem as fs_mod
        import torch.distributed.checkpoint.metadata as md_mod

        self.classes: dict[str, type] = {}
        globals_: dict[tuple[str, str], Any] = {}
        for name in _MD_CLASSES:
            cls = getattr(md_mod, name, None)
            if isinstance(cls, type) and cls.__module__ == _MD_MODULE and cls.__qualname__ == name:
                self.classes[name] = cls
                globals_[(_MD_MODULE, name)] = cls
        info = getattr(fs_mod, "_StorageInfo", None)
        if isinstance(info, type) and info.__module__ == _FS_MODULE:
            self.classes["_StorageInfo"] = info
            globals_[(_FS_MODULE, "_StorageInfo")] = info
        self.instance_ids = {id(c): c for c in self.classes.values()}
        enum = getattr(md_mod, "_MEM_FORMAT_ENCODING", None)
        self.enums: tuple[Any, ...] = (enum,) if enum is not None else ()
        for e in self.enums:
            globals_[(_MD_MODULE, e.__qualname__)] = e
        for name, v in vars(torch).items():
            if isinstance(v, torch.dtype | torch.layout):
                globals_[("torch", name)] = v
        for name in _MEMORY_FORMATS:
            if isinstance(getattr(torch, name, None), torch.memory_format):
                globals_[("torch", name)] = getattr(torch, name)
        self.layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
        # Constructors REDUCE may call: each one is answered by a function here that checks its arguments.
        # Objects stand for themselves on the stack; a few functions only through a marker.
        self.reducers: dict[int, tuple[Any, Callable[[tuple[Any, ...]], Any]]] = {}

        def reducer(key: tuple[str, str], obj: Any, fn: Callable[[tuple[Any, ...]], Any]) -> None:
            globals_[key] = obj
            self.reducers[id(obj)] = (obj, fn)

        reducer(("torch", "Size"), torch.Size, _make_size)
        reducer(("collections", "OrderedDict"), collections.OrderedDict, _make_ordered_dict)
        reducer(("builtins", "set"), set, lambda a: _make_set(a, set))
        reducer(("builtins", "frozenset"), frozenset, lambda a: _make_set(a, frozenset))
        for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            cls = getattr(pathlib, name)
            reducer(("pathlib", name), cls, lambda a, cls=cls: _make_path(a, cls))
        reducer(("torch.serialization", "_get_layout"), _GET_LAYOUT, self._layout)
        reducer(("builtins", "getattr"), _GETATTR, self._enum_member)
        for e in self.enums:
            self.reducers[id(e)] = (e, lambda a, e=e: self._enum_value(e, a))
        self.globals = globals_

    def _layout(self, args: tuple[Any, ...]) -> Any:
        if len(args) != 1 or not isinstance(args[0], str) or args[0] not in self.layouts:
            raise _Refused(f"_get_layout{_short(args)} is not a torch layout")
        return self.layouts[args[0]]

    def _enum_member(self, args: tuple[Any, ...]) -> Any:
        # builtins.getattr(ENUM, "NAME") for members of the allowed enums only; never a real getattr.
        if len(args) != 2 or not any(args[0] is e for e in self.enums) or not isinstance(args[1], str):
            raise _Refused(f"getattr{_short(args)}: only members of the DCP metadata enums may be looked up")
        members = args[0].__members__
        if args[1] not in members:
            raise _Refused(f"getattr{_short(args)}: {args[1]!r} is not a member of {args[0].__qualname__}")
        return members[args[1]]

    def _enum_value(self, enum: Any, args: tuple[Any, ...]) -> Any:
        if len(args) != 1 or isinstance(args[0], bool) or not isinstance(args[0], int | str):
            raise _Refused(f"{enum.__qualname__}{_short(args)} is not a member value")
        for m in enum.__members__.values():
            if type(m.value) is type(args[0]) and m.value == args[0]:
                return m
        raise ManifestError(f"{args[0]!r} is not a value of {enum.__qualname__}")


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_GET_LAYOUT = _Marker("torch.serialization._get_layout")
_GETATTR = _Marker("builtins.getattr")


def _short(args: Any) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "..."


def _plain_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _make_size(args: tuple[Any, ...]) -> torch.Size:
    if len(args) != 1 or type(args[0]) not in (tuple, list) or not all(_plain_int(x) for x in args[0]):
        raise _Refused(f"torch.Size{_short(args)}: a torch.Size is made from one tuple of ints")
    return torch.Size(args[0])


def _make_ordered_dict(args: tuple[Any, ...]) -> collections.OrderedDict[Any, Any]:
    if not args:
        return collections.OrderedDict()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        pairs = args[0]
        if all(type(p) in (list, tuple) and len(p) == 2 for p in pairs):
            return collections.OrderedDict((p[0], p[1]) for p in pairs)
    raise _Refused(f"OrderedDict{_short(args)}: expected no arguments or one list of pairs")


def _make_set(args: tuple[Any, ...], kind: type) -> Any:
    if not args:
        return kind()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        return kind(args[0])
    raise _Refused(f"{kind.__name__}{_short(args)}: expected no arguments or one list")


def _make_path(args: tuple[Any, ...], cls: type) -> Any:
    if not all(type(a) is str for a in args):
        raise _Refused(f"{cls.__name__}{_short(args)}: a path is made from strings")
    try:
        return cls(*args)
    except NotImplementedError:  # a WindowsPath on POSIX or the reverse: the pure flavour says the same
        pure = pathlib.PureWindowsPath if "Windows" in cls.__name__ else pathlib.PurePosixPath
        return pure(*args)


_TABLES: _Tables | None = None


def _tables() -> _Tables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _Tables()
    return _TABLES


_MARK = object()


def loads(data: bytes, *, where: str = "DCP metadata") -> Any:
    """Unpickle ``data`` with the DCP metadata allow-list (see the module docstring); nothing else runs.

    Example::

        md = loads(open("ckpt/.metadata", "rb").read())
    """
    try:
        return _run(data, _tables(), where)
    except _Refused as e:
        raise needs_trust(
            UnsafeCheckpointError,
            f"{where} is not a plain torch.distributed.checkpoint index ({e}): refused by the allow-list of DCP "
            "metadata, nothing from it was run",
            "Pass {flag} if you trust who wrote it (DCP's own unpickler then reads it)",
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # anything else the data made our own code raise: a damaged index
        raise ManifestError(f"{where} is not a valid pickle: {type(e).__name__}: {_short(str(e))}") from None


_REFUSED_OPS = {
    ord("i"): "INST",
    ord("o"): "OBJ",
    0x92: "NEWOBJ_EX",
    0x82: "EXT1",
    0x83: "EXT2",
    0x84: "EXT4",
    ord("P"): "PERSID",
    ord("Q"): "BINPERSID",
    0x97: "NEXT_BUFFER",
    0x98: "READONLY_BUFFER",
    ord("S"): "STRING",
    ord("T"): "BINSTRING",
    ord("U"): "SHORT_BINSTRING",
}
_U4 = struct.Struct("<I")
_I4 = struct.Struct("<i")
_U8 = struct.Struct("<Q")
_F8 = struct.Struct(">d")


def _run(data: bytes, t: _Tables, where: str) -> Any:
    """The pickle machine: pickle's own semantics for the opcodes DCP metadata uses, decoded here (the argument
    formats of ``pickletools``), with the allow-list checks of the module docstring."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    n = len(data)
    pos = 0
    proto = 0
    floor = 0  # the stack below the innermost MARK is out of reach

    def take(k: int) -> bytes:
        nonlocal pos
        if k < 0 or pos + k > n:
            raise ManifestError(f"{where}: pickle data is truncated")
        out = data[pos : pos + k]
        pos += k
        return out

    def line() -> bytes:
        nonlocal pos
        end = data.find(b"\n", pos)
        if end < 0:
            raise ManifestError(f"{where}: pickle data is truncated")
        out = data[pos:end]
        pos = end + 1
        return out

    def pop_mark() -> list[Any]:
        nonlocal floor
        if not marks:
            raise ManifestError(f"{where}: pickle has no MARK where one is needed")
        at = marks.pop()
        floor = marks[-1] if marks else 0
        items = stack[at:]
        del stack[at:]
        return items

    def underflow() -> ManifestError:
        return ManifestError(f"{where}: pickle stack underflow")

    def container(kinds: tuple[type, ...], op: str) -> Any:
        if len(stack) <= floor:
            raise underflow()
        obj = stack[-1]
        if type(obj) not in kinds:
            raise _Refused(f"{op} on a {type(obj).__name__}")
        return obj

    while True:
        if pos >= n:
            raise ManifestError(f"{where}: pickle ends without STOP")
        code = data[pos]
        pos += 1
        if code == 0x68:  # BINGET
            i = take(1)[0]
            if i not in memo:
                raise ManifestError(f"{where}: pickle refers to memo entry {i}, never stored")
            stack.append(memo[i])
        elif code == 0x94:  # MEMOIZE
            if len(stack) <= floor:
                raise underflow()
            memo[len(memo)] = stack[-1]
        elif code == 0x8C:  # SHORT_BINUNICODE
            stack.append(take(take(1)[0]).decode("utf-8", "surrogatepass"))
        elif code == 0x58:  # BINUNICODE
            stack.append(take(_U4.unpack(take(4))[0]).decode("utf-8", "surrogatepass"))
        elif code == 0x8D:  # BINUNICODE8
            stack.append(take(_U8.unpack(take(8))[0]).decode("utf-8", "surrogatepass"))
        elif code == 0x4B:  # BININT1
            stack.append(take(1)[0])
        elif code == 0x4D:  # BININT2
            stack.append(int.from_bytes(take(2), "little"))
        elif code == 0x4A:  # BININT
            stack.append(_I4.unpack(take(4))[0])
        elif code in (0x85, 0x86, 0x87):  # TUPLE1/2/3
            k = code - 0x84
            if len(stack) - floor < k:
                raise underflow()
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif code == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif code == 0x28:  # MARK
            marks.append(len(stack))
            floor = len(stack)
        elif code == 0x74:  # TUPLE
            stack.append(tuple(pop_mark()))
        elif code == 0x81:  # NEWOBJ
            if len(stack) - floor < 2:
                raise underflow()
            args = stack.pop()
            cls = stack.pop()
            if t.instance_ids.get(id(cls)) is not cls:
                raise _Refused(f"it creates {_describe(cls)}, which is not a DCP metadata class")
            if args != ():
                raise _Refused(f"it creates {cls.__qualname__} with arguments {_short(args)}")
            stack.append(cls.__new__(cls))
        elif code == 0x62:  # BUILD
            if len(stack) - floor < 2:
                raise underflow()
            state = stack.pop()
            _build(t, stack[-1], state)
        elif code == 0x52:  # REDUCE
            if len(stack) - floor < 2:
                raise underflow()
            args = stack.pop()
            func = stack.pop()
            entry = t.reducers.get(id(func))
            if entry is None or entry[0] is not func:
                raise _Refused(f"it calls {_describe(func)}, which is not an allowed constructor")
            if type(args) is not tuple:
                raise ManifestError(f"{where}: REDUCE arguments are a {type(args).__name__}, not a tuple")
            stack.append(entry[1](args))
        elif code == 0x93 or code == 0x63:  # STACK_GLOBAL, GLOBAL
            if code == 0x63:
                module, attr = line().decode("utf-8"), line().decode("utf-8")
            else:
                if len(stack) - floor < 2:
                    raise underflow()
                attr = stack.pop()
                module = stack.pop()
            stack.append(_global(t, module, attr, proto))
        elif code == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif code == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif code == 0x75:  # SETITEMS
            items = pop_mark()
            if len(items) % 2:
                raise ManifestError(f"{where}: odd number of items for SETITEMS")
            d = container((dict, collections.OrderedDict), "SETITEMS")
            for i in range(0, len(items), 2):
                d[items[i]] = items[i + 1]
        elif code == 0x73:  # SETITEM
            if len(stack) - floor < 3:
                raise underflow()
            v = stack.pop()
            k = stack.pop()
            container((dict, collections.OrderedDict), "SETITEM")[k] = v
        elif code == 0x61:  # APPEND
            if len(stack) - floor < 2:
                raise underflow()
            v = stack.pop()
            container((list,), "APPEND").append(v)
        elif code == 0x65:  # APPENDS
            items = pop_mark()
            container((list,), "APPENDS").extend(items)
        elif code == 0x4E:  # NONE
            stack.append(None)
        elif code == 0x88 or code == 0x89:  # NEWTRUE, NEWFALSE
            stack.append(code == 0x88)
        elif code == 0x71:  # BINPUT
            if len(stack) <= floor:
                raise underflow()
            memo[take(1)[0]] = stack[-1]
        elif code == 0x72:  # LONG_BINPUT
            if len(stack) <= floor:
                raise underflow()
            memo[_U4.unpack(take(4))[0]] = stack[-1]
        elif code == 0x70:  # PUT
            if len(stack) <= floor:
                raise underflow()
            memo[int(line())] = stack[-1]
        elif code == 0x6A or code == 0x67:  # LONG_BINGET, GET
            i = _U4.unpack(take(4))[0] if code == 0x6A else int(line())
            if i not in memo:
                raise ManifestError(f"{where}: pickle refers to memo entry {i}, never stored")
            stack.append(memo[i])
        elif code == 0x95:  # FRAME: a length hint only
            take(8)
        elif code == 0x80:  # PROTO
            proto = take(1)[0]
            if proto > pickle.HIGHEST_PROTOCOL:
                raise ManifestError(f"{where}: unsupported pickle protocol {proto}")
        elif code == 0x2E:  # STOP
            if len(stack) != 1 or marks:
                raise ManifestError(f"{where}: pickle stops with {len(stack)} values on its stack")
            return stack[0]
        elif code == 0x49:  # INT (protocol 0): "00"/"01" are the booleans
            text = line()
            stack.append(False if text == b"00" else True if text == b"01" else int(text, 0))
        elif code == 0x4C:  # LONG (protocol 0)
            stack.append(int(line().rstrip(b"L"), 0))
        elif code == 0x8A:  # LONG1
            stack.append(int.from_bytes(take(take(1)[0]), "little", signed=True))
        elif code == 0x8B:  # LONG4
            stack.append(int.from_bytes(take(_I4.unpack(take(4))[0]), "little", signed=True))
        elif code == 0x46:  # FLOAT
            stack.append(float(line()))
        elif code == 0x47:  # BINFLOAT
            stack.append(_F8.unpack(take(8))[0])
        elif code == 0x56:  # UNICODE (protocol 0)
            stack.append(line().decode("raw-unicode-escape"))
        elif code == 0x43:  # SHORT_BINBYTES
            stack.append(take(take(1)[0]))
        elif code == 0x42:  # BINBYTES
            stack.append(take(_U4.unpack(take(4))[0]))
        elif code == 0x8E or code == 0x96:  # BINBYTES8, BYTEARRAY8
            b = take(_U8.unpack(take(8))[0])
            stack.append(b if code == 0x8E else bytearray(b))
        elif code == 0x8F:  # EMPTY_SET
            stack.append(set())
        elif code == 0x90:  # ADDITEMS
            items = pop_mark()
            container((set,), "ADDITEMS").update(items)
        elif code == 0x91:  # FROZENSET
            stack.append(frozenset(pop_mark()))
        elif code == 0x6C:  # LIST
            stack.append(pop_mark())
        elif code == 0x64:  # DICT
            items = pop_mark()
            if len(items) % 2:
                raise ManifestError(f"{where}: odd number of items for a dict")
            stack.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})
        elif code == 0x30:  # POP
            if len(stack) <= floor:
                if marks and len(stack) == floor:  # POP of a MARK
                    pop_mark()
                    continue
                raise underflow()
            stack.pop()
        elif code == 0x31:  # POP_MARK
            pop_mark()
        elif code == 0x32:  # DUP
            if len(stack) <= floor:
                raise underflow()
            stack.append(stack[-1])
        elif code in _REFUSED_OPS:
            raise _Refused(f"it uses the pickle opcode {_REFUSED_OPS[code]}, which DCP metadata does not need")
        else:
            raise ManifestError(f"{where}: invalid pickle opcode {code:#04x} at byte {pos - 1}")


def _describe(obj: Any) -> str:
    if isinstance(obj, type | _Marker) or callable(obj):
        mod = getattr(obj, "__module__", "") or ""
        return f"{mod + '.' if mod else ''}{getattr(obj, '__qualname__', repr(obj))}"
    return f"a {type(obj).__name__}"


def _global(t: _Tables, module: Any, attr: Any, proto: int) -> Any:
    if type(module) is not str or type(attr) is not str:
        raise _Refused("a global whose module or name is not a string")
    if proto < 3:  # Python 2 names, as pickle.Unpickler(fix_imports=True) maps them (e.g. __builtin__.set)
        if (module, attr) in _compat_pickle.NAME_MAPPING:
            module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    if "." in attr:
        raise _Refused(f"it names {module!r} attribute {attr!r}: dotted names are refused")
    key = (module, attr)
    if key not in t.globals:
        raise _Refused(f"it wants {module}.{attr}, which is not on the allow-list of DCP metadata classes")
    return t.globals[key]


def _build(t: _Tables, inst: Any, state: Any) -> None:
    cls = type(inst)
    if t.instance_ids.get(id(cls)) is not cls:
        raise _Refused(f"it sets the state of {_describe(inst)}, which is not a DCP metadata object")
    setstate = cls.__dict__.get("__setstate__")
    if setstate is not None:  # TensorProperties: DCP's own, given plain data
        if type(state) is not tuple:
            raise ManifestError(f"the state of a {cls.__qualname__} is a {type(state).__name__}, not a tuple")
        setstate(inst, state)
        return
    slots = None
    if type(state) is tuple and len(state) == 2:
        state, slots = state
    for part in (state, slots):
        if part is None:
            continue
        if type(part) is not dict:
            raise ManifestError(f"the state of a {cls.__qualname__} is a {type(part).__name__}, not a dict")
        for k in part:
            if type(k) is not str or (k.startswith("__") and k.endswith("__")):
                raise _Refused(f"it sets the attribute {k!r} of a {cls.__qualname__}")
    if state:
        inst.__dict__.update(state)
    for k, v in (slots or {}).items():
        object.__setattr__(inst, k, v)


# -- checking the loaded metadata ------------------------------------------------------------------------------
def _safe_name(rel: Any) -> bool:
    return (
        isinstance(rel, str)
        and "/" not in rel
        and "\\" not in rel
        and rel not in ("", ".", "..")
        and ("\x00" not in rel)
    )


def check_storage_paths(md: Any, where: str) -> None:
    """Every data file the index names is a plain file name inside the checkpoint directory."""
    data = getattr(md, "storage_data", None)
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: storage_data is a {type(data).__name__}, not a dict")
    for info in data.values():
        rel = getattr(info, "relative_path", "")
        if not _safe_name(rel):
            raise UnsafeCheckpointError(f"{where} refers to data file {rel!r} outside the directory")


def check_metadata(md: Any, where: str, directory: str) -> None:
    """Check that a DCP ``Metadata`` from :func:`loads` has the shape the DCP reader relies on.

    Types and bounds of every tensor, chunk and storage entry; ``planner_data`` paths (which rebuild the nested
    state) of strings and small non-negative ints; and the tensors' total size backed by the data files on disk,
    so that a few-byte index cannot make the reader allocate terabytes. Any problem is a ``ManifestError``
    (an ``UnsafeCheckpointError`` for a data file outside ``directory``).
    """
    t = _tables()
    c = t.classes

    def bad(msg: str) -> ManifestError:
        return ManifestError(f"{where}: {msg}")

    def is_(obj: Any, name: str) -> bool:
        return name in c and type(obj) is c[name]

    def size_ok(s: Any) -> bool:
        return type(s) is torch.Size and all(_plain_int(x) and x >= 0 for x in s)

    if not is_(md, "Metadata"):
        raise bad(f"the index holds a {type(md).__name__}, not a DCP Metadata")
    sdm = getattr(md, "state_dict_metadata", None)
    if type(sdm) is not dict:
        raise bad("state_dict_metadata is not a dict")
    claimed = 0
    for fqn, v in sdm.items():
        if type(fqn) is not str:
            raise bad(f"state_dict_metadata key {fqn!r} is not a string")
        if is_(v, "BytesStorageMetadata"):
            continue
        if not is_(v, "TensorStorageMetadata"):
            raise bad(f"{fqn!r} is described by a {type(v).__name__}")
        props, size, chunks = (getattr(v, a, None) for a in ("properties", "size", "chunks"))
        if not is_(props, "TensorProperties") or not isinstance(getattr(props, "dtype", None), torch.dtype):
            raise bad(f"{fqn!r} has no valid tensor properties (dtype)")
        if not size_ok(size):
            raise bad(f"{fqn!r} has size {size!r}, not a torch.Size of non-negative ints")
        if type(chunks) is not list:
            raise bad(f"{fqn!r} has chunks of type {type(chunks).__name__}")
        for ch in chunks:
            off, sz = getattr(ch, "offsets", None), getattr(ch, "sizes", None)
            if not is_(ch, "ChunkStorageMetadata") or not size_ok(off) or not size_ok(sz):
                raise bad(f"{fqn!r} has an invalid chunk")
            if len(off) != len(size) or len(sz) != len(size) or any(o + s > d for o, s, d in zip(off, sz, size)):
                raise bad(f"{fqn!r} has a chunk (offsets {list(off)}, sizes {list(sz)}) outside its size {list(size)}")
        claimed += math.prod(size) * props.dtype.itemsize
    data = getattr(md, "storage_data", None)
    check_storage_paths(md, where)
    transformed = False
    files: set[str] = set()
    for idx, info in data.items():
        if not is_(idx, "MetadataIndex") or type(getattr(idx, "fqn", None)) is not str:
            raise bad("storage_data has a key that is not a MetadataIndex")
        off = getattr(idx, "offset", None)
        if off is not None and not size_ok(off):
            raise bad(f"storage_data key {idx.fqn!r} has offset {off!r}")
        if not is_(info, "_StorageInfo"):
            raise bad(f"storage_data of {idx.fqn!r} is a {type(info).__name__}")
        if not (_plain_int(info.offset) and info.offset >= 0 and _plain_int(info.length) and info.length >= 0):
            raise bad(f"storage_data of {idx.fqn!r} has offset {info.offset!r} / length {info.length!r}")
        td = getattr(info, "transform_descriptors", None)
        if td is not None:
            if type(td) not in (list, tuple) or not all(type(x) is str for x in td):
                raise bad(f"storage_data of {idx.fqn!r} has transform descriptors {td!r}")
            transformed = transformed or bool(td)
        files.add(info.relative_path)
    on_disk = 0
    real_dir = os.path.realpath(directory)
    for rel in files:
        p = os.path.join(directory, rel)
        if not os.path.lexists(p):
            raise bad(f"its data file {rel!r} is missing")
        real = os.path.realpath(p)
        if os.path.dirname(real) != real_dir:  # a symlink to a file elsewhere (a private key, /dev/zero, ...)
            raise UnsafeCheckpointError(f"{where}: its data file {rel!r} is a link to {real}, outside {directory}")
        if not os.path.isfile(real):  # a FIFO would block the reader forever
            raise bad(f"its data file {rel!r} is not a regular file")
        on_disk += os.path.getsize(real)
    limit = on_disk * (256 if transformed else 1) + (1 << 20)
    if claimed > limit:
        raise bad(
            f"its tensors would take {claimed} bytes but its data files hold {on_disk} bytes: the index is damaged"
        )
    _check_planner_data(getattr(md, "planner_data", None), bad)
    sm = getattr(md, "storage_meta", None)
    if sm is not None and not is_(sm, "StorageMeta"):
        raise bad(f"storage_meta is a {type(sm).__name__}")
    ver = getattr(md, "version", None)
    if ver is not None and type(ver) is not str:
        raise bad(f"version is a {type(ver).__name__}")


def _check_planner_data(pd: Any, bad: Callable[[str], ManifestError]) -> None:
    """``planner_data`` maps flat keys to the paths DCP's ``set_element`` rebuilds the nested state along; an int
    in a path grows a list to that length, so the lists' total length is bounded by the number of entries."""
    if pd is None:
        return
    if type(pd) is not dict:
        raise bad(f"planner_data is a {type(pd).__name__}, not a dict")
    lengths: dict[tuple[Any, ...], int] = {}
    for k, path in pd.items():
        if type(k) is not str or type(path) not in (tuple, list) or not path:
            raise bad(f"planner_data entry {_short(k)} is not a non-empty path")
        for i, part in enumerate(path):
            if type(part) is str:
                continue
            if not _plain_int(part) or part < 0:
                raise bad(f"planner_data path of {k!r} has the part {part!r}")
            prefix = tuple(path[:i])
            lengths[prefix] = max(lengths.get(prefix, 0), part + 1)
    total = sum(lengths.values())
    if total > 16 * len(pd) + 4096:
        raise bad(f"planner_data would build lists of {total} items for {len(pd)} entries: the index is damaged")


def read_metadata_file(path: str) -> Any:
    """Read and unpickle ``path`` (a DCP ``.metadata``) with :func:`loads`."""
    try:
        size = os.path.getsize(path)
        if size > MAX_METADATA_BYTES:
            raise ManifestError(f"{path}: {size} bytes is larger than the {MAX_METADATA_BYTES} bytes allowed")
        with open(path, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    return loads(data, where=path)


__all__ = ["check_metadata", "check_storage_paths", "loads", "read_metadata_file"]
