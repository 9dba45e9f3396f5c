"""Interoperability with the rest of the PyTorch world: ``torch.save`` files, safetensors, torch.distributed.checkpoint.

- :func:`export_step` writes a committed step as ``OUT.pt`` (the nested state dict, readable by
  ``torch.load(OUT, weights_only=True)``) or ``OUT.safetensors`` (consolidated tensors under flat keys, the
  nesting kept in the file's metadata so that :func:`load_external` rebuilds it exactly).
- :func:`load_external` reads a ``.pt``/``.pth`` file (``torch.load(weights_only=True)``), a ``.safetensors`` file
  (or a sharded ``*.safetensors.index.json``), or a torch.distributed.checkpoint directory — single process, no
  process group, and without unpickling arbitrary objects unless ``trusted``.
- :func:`diff_steps` compares two steps: keys added/removed, shape/dtype changes, max abs difference per tensor,
  changed values; :func:`summarize` describes a step the way the PyTorch tutorial prints a ``state_dict``.

Example::

    from ckptstore import CheckpointManager
    from ckptstore.interop import export_step, import_external

    mgr = CheckpointManager("/ckpt")
    export_step(mgr, 1200, "model.pt", select="model")      # torch.load("model.pt", weights_only=True)
    import_external("legacy.pth", mgr, step=0, under="model")
"""

from __future__ import annotations

import io as _pyio
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._dcp_metadata import needs_trust
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ManifestError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .format.manifest import Manifest, TensorEntry, decode_json, encode_json, step_dir
from .format.state import escape_part, flatten, join_key, unflatten
from .io import plan_fill, read_pieces
from .options import IOOptions
from .storage.base import Storage

log = logging.getLogger("ckptstore")

TREE_META_KEY = "ckptstore.tree"
_DIFF_CHUNK = 1 << 22


# -- reading single tensors -----------------------------------------------------------------------------------
def read_tensor(storage: Storage, m: Manifest, key: str, *, verify: bool = True) -> torch.Tensor:
    """Read one tensor of a step (full, consolidated from its pieces), checksums verified.

    Pickled entries come back as their raw bytes (a ``uint8`` tensor) — never unpickled here.

    Example::

        w = read_tensor(mgr.storage, mgr.manifest(1200), "model/fc1.weight")
    """
    e = m.tensors.get(key)
    if e is None:
        raise CheckpointNotFoundError(f"step {m.step} has no tensor {key!r}", step=m.step)
    dtype = e.torch_dtype if e.encoding == "raw" else torch.uint8
    t = torch.empty(e.shape, dtype=dtype)
    read_pieces(storage, step_dir(m.step), plan_fill(key, e, t), IOOptions(verify=verify), step=m.step)
    return t


# -- selecting a subtree -----------------------------------------------------------------------------------------
def select(value: Any, path: str | None) -> Any:
    """The part of a nested value at ``path`` (``/``-separated; list indices and int dict keys as numbers).

    Example::

        select(state, "optim/param_groups/0/lr")   # 0.001
    """
    if not path:
        return value
    cur = value
    done: list[str] = []
    for part in path.strip("/").split("/"):
        if isinstance(cur, Mapping):
            if part in cur:
                cur = cur[part]
            elif part.lstrip("-").isdigit() and int(part) in cur:
                cur = cur[int(part)]
            else:
                keys = ", ".join(map(str, list(cur)[:20]))
                raise CheckpointNotFoundError(f"no {part!r} under {'/'.join(done) or 'the root'} (keys: {keys})")
        elif isinstance(cur, (list, tuple)) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise CheckpointNotFoundError(f"cannot select {part!r} under {'/'.join(done) or 'the root'}")
        done.append(part)
    return cur


# -- export ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_step` wrote."""

    path: str
    format: str
    step: int
    tensors: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "step": self.step, "tensors": self.tensors,
                "nbytes": self.nbytes}  # fmt: skip


def export_format(path: str) -> str:
    """``"torch"`` for ``.pt``/``.pth``, ``"safetensors"`` for ``.safetensors``; else ``UnsupportedValueError``."""
    low = path.lower()
    if low.endswith((".pt", ".pth")):
        return "torch"
    if low.endswith(".safetensors"):
        return "safetensors"
    raise UnsupportedValueError(f"cannot tell the export format of {path!r}: name it *.pt, *.pth or *.safetensors")


def export_step(
    mgr: Any,
    step: int | str,
    out: str | os.PathLike[str],
    *,
    select_path: str | None = None,
    trusted: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write committed ``step`` of ``mgr`` (a CheckpointManager) to ``out`` (``.pt``/``.pth``/``.safetensors``).

    ``.pt``: ``torch.save`` of the nested state as ``mgr.load`` returns it (modules and optimizers as their state
    dicts), loadable with ``torch.load(out, weights_only=True)``. ``.safetensors``: every tensor under its flat
    key (``model/fc1.weight``), with step/epoch/metrics and the nesting as JSON in the file's metadata.
    ``select_path`` exports a subtree only, e.g. ``"model"`` gives the plain model ``state_dict`` of the tutorial
    (``model.load_state_dict(torch.load(out, weights_only=True))``). The file is written to a temporary name
    and renamed; an existing ``out`` raises ``CheckpointExistsError`` unless ``overwrite``.

    Example::

        export_step(mgr, "latest", "model.safetensors", select_path="model")
    """
    out = os.fspath(out)
    fmt = export_format(out)
    if os.path.exists(out) and not overwrite:
        raise _with_cli_message(
            CheckpointExistsError(f"{out} already exists: pass overwrite=True to replace it"),
            f"{out} already exists: pass --force to replace it",
        )
    if step in ("latest", "best"):
        info = mgr.latest() if step == "latest" else mgr.best()
        if info is None:
            raise CheckpointNotFoundError(f"no committed step under {mgr.url}")
        step = info.step
    m: Manifest = mgr.manifest(int(step))
    pickled = [k for k, e in m.tensors.items() if e.encoding == "pickle"]
    if pickled and fmt == "safetensors":
        raise needs_trust(
            UnsupportedValueError,
            f"step {m.step} holds pickled objects ({', '.join(pickled[:5])}) that safetensors cannot store",
            "Export to .pt with {flag}, or select a subtree without them",
        )
    if pickled and not trusted:
        raise needs_trust(
            UnsafeCheckpointError,
            f"step {m.step} contains pickled objects ({', '.join(pickled[:5])}); unpickling runs code from the "
            "checkpoint",
            "Pass {flag} only if you trust who wrote it, or select a subtree without them",
        )
    state = mgr.load(m.step, map_location="cpu", trusted=trusted)
    value = select(state, select_path)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        if fmt == "torch":
            torch.save(value, tmp)
            tensors = _count_tensors(value)
        else:
            tensors = _save_safetensors(value, tmp, m, select_path)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if m.has_pickles and fmt == "torch":
        log.warning("%s contains pickled objects: torch.load(weights_only=True) will refuse it", out)
    return ExportResult(out, fmt, m.step, tensors[0], tensors[1])


def _count_tensors(value: Any) -> tuple[int, int]:
    n = nbytes = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            n += 1
            nbytes += v.numel() * v.element_size()
        elif isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return n, nbytes


def _save_safetensors(value: Any, path: str, m: Manifest, select_path: str | None) -> tuple[int, int]:
    from safetensors.torch import save_file

    if isinstance(value, torch.Tensor):
        name = (select_path or "tensor").strip("/").rsplit("/", 1)[-1] or "tensor"
        value = {name: value}
    flat = flatten(value)  # no pickles: load() only returns pickled objects with trusted=True, refused here
    tensors = {k: t.contiguous() for k, t in flat.tensors.items()}
    meta = {
        "format": "pt",
        "ckptstore.step": str(m.step),
        "ckptstore.epoch": json.dumps(m.epoch),
        "ckptstore.metrics": json.dumps(encode_json(m.metrics, "metrics"), allow_nan=False),
        TREE_META_KEY: json.dumps(flat.tree, allow_nan=False, separators=(",", ":")),
    }
    if select_path:
        meta["ckptstore.select"] = select_path
    try:
        save_file(tensors, path, metadata=meta)
    except (ValueError, TypeError) as e:  # e.g. a dtype safetensors has no tag for
        raise UnsupportedValueError(f"safetensors cannot store this state: {e}") from None
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


# -- import ------------------------------------------------------------------------------------------------------
@dataclass
class External:
    """A state read from a foreign file, with whatever step information the file carried."""

    state: Any
    format: str
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    has_pickles: bool = False


def detect_format(path: str) -> str:
    """``"dcp"`` (a torch.distributed.checkpoint directory), ``"safetensors"``, ``"safetensors-index"`` or
    ``"torch"`` (anything ``torch.load`` reads)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, ".metadata")):
            return "dcp"
        raise ManifestError(
            f"{path} is a directory without .metadata, so not a torch.distributed.checkpoint: {_NOT_A_CHECKPOINT}"
        )
    low = path.lower()
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith(".index.json"):
        return "safetensors-index"
    return "torch"


def load_external(path: str | os.PathLike[str], *, trusted: bool = False) -> External:
    """Read a ``.pt``/``.pth`` file, a ``.safetensors`` file, a ``*.safetensors.index.json`` or a DCP directory.

    Nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows unless ``trusted`` (then
    ``torch.load(weights_only=False)`` and DCP's own unpickling are used — only for files you trust). DCP
    directories are read in this process without a process group; their optimizer state keys (which DCP turns
    into strings) are turned back into the integers ``Optimizer.load_state_dict`` expects.

    Example::

        ext = load_external("dcp_ckpt/")       # ext.state == {"model": {...}, "optim": {...}, ...}
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist")
    fmt = detect_format(path)
    if fmt == "dcp":
        return External(_load_dcp(path, trusted=trusted), "dcp", has_pickles=False)
    if fmt in ("safetensors", "safetensors-index"):
        return _load_safetensors(path, index=fmt == "safetensors-index")
    _check_torch_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return External(state, "torch")
    except pickle.UnpicklingError as e:
        if not trusted:
            reason = _weights_only_reason(e)
            if not _wants_globals(reason):
                raise needs_trust(
                    ManifestError,
                    f"{path} is damaged or not a torch.save file: torch.load(weights_only=True) cannot read it "
                    f"({reason})",
                    "If it is a torch.save file and you trust who wrote it, {flag} reads it with the full unpickler",
                ) from None
            raise needs_trust(
                UnsafeCheckpointError,
                f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses ({reason})",
                "Re-save it as a plain state_dict, or pass {flag} if you trust who wrote it",
            ) from None
    except Exception as e:  # damaged data: torch's readers raise whatever they meet (IndexError, KeyError, ...)
        raise ManifestError(f"{path} is not a file torch.load can read: {type(e).__name__}: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the caller
    except Exception as e:
        raise ManifestError(f"{path} is not a file torch.load can read: {type(e).__name__}: {e}") from None
    return External(state, "torch", has_pickles=True)


_MAX_INDEX_BYTES = 64 << 20

_NOT_A_CHECKPOINT = (
    "expected a torch.save file (.pt/.pth), a .safetensors file, a *.safetensors.index.json or a "
    "torch.distributed.checkpoint directory"
)


def _check_regular_file(path: str) -> None:
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO, a device, a socket: could block or never end
        raise ManifestError(f"{path} is not a regular file: {_NOT_A_CHECKPOINT}")


def _check_torch_file(path: str) -> None:
    """A torch.save file is a zip archive (torch >= 1.6) or a pickle (the legacy format): refuse anything else
    before torch's readers see it."""
    _check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ManifestError(f"{path} is not a checkpoint ({'an empty file' if not head else 'unknown content'}): "
                            f"{_NOT_A_CHECKPOINT}")  # fmt: skip


def _load_safetensors(path: str, *, index: bool) -> External:
    from safetensors import SafetensorError, safe_open

    files = [path]
    _check_regular_file(path)
    if index:
        try:
            if os.path.getsize(path) > _MAX_INDEX_BYTES:
                raise ValueError(f"larger than {_MAX_INDEX_BYTES} bytes")
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ManifestError(f"{path} is not a safetensors index (weight_map): {e}") from None
        base = os.path.dirname(path)
        files = []
        for n in names:
            if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", ".."):
                raise UnsafeCheckpointError(f"{path} refers to {n!r}, not a file next to the index")
            files.append(os.path.join(base, n))
            _check_regular_file(files[-1])
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for fpath in files:
        try:
            with safe_open(fpath, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {}) if not index else meta
                for k in f.keys():
                    if k in tensors:
                        raise ManifestError(f"tensor {k!r} appears in two shards of {path}")
                    tensors[k] = f.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise ManifestError(f"{fpath} is not a readable safetensors file: {e}") from None
    ext = External(tensors, "safetensors")
    tree_s = meta.get(TREE_META_KEY)
    if tree_s:
        try:
            tree = json.loads(tree_s)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"{path}: invalid {TREE_META_KEY} metadata: {type(e).__name__}: {e}") from None

        def get(key: str, node: dict[str, Any]) -> Any:
            if node.get("t") != "tensor":
                raise UnsafeCheckpointError(f"{path}: the {TREE_META_KEY} metadata refers to a pickled object")
            if key not in tensors:
                raise ManifestError(f"{path}: the {TREE_META_KEY} metadata refers to {key!r}, absent from the file")
            return tensors[key]

        try:
            ext.state = unflatten(tree, get)
        except RecursionError:
            raise ManifestError(f"{path}: the {TREE_META_KEY} metadata is nested too deeply") from None
        try:
            epoch = json.loads(meta.get("ckptstore.epoch", "null"))
            ext.epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
            metrics = decode_json(json.loads(meta.get("ckptstore.metrics", "{}")))
            ext.metrics = metrics if isinstance(metrics, dict) else {}
        except (ValueError, RecursionError, CheckpointError):
            log.warning("%s: ignoring unreadable ckptstore.epoch/metrics metadata", path)
    return ext


def _load_dcp(path: str, *, trusted: bool) -> Any:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    from . import _dcp_metadata

    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        raise ManifestError(f"{meta_path} is not a regular file: not a torch.distributed.checkpoint")
    cache: dict[str, Any] = {}

    class SafeReader(dcp.FileSystemReader):  # type: ignore[misc]
        """DCP keeps its index in a raw pickle; unless trusted, read it with ckptstore._dcp_metadata only."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if trusted:
                md = super().read_metadata(*args, **kwargs)
                _dcp_metadata.check_storage_paths(md, meta_path)
                return md
            if "md" not in cache:
                md = _dcp_metadata.read_metadata_file(meta_path)
                _dcp_metadata.check_metadata(md, meta_path, path)
                cache["md"] = md
            md = cache["md"]
            if md.storage_meta is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(_EmptyStateDictLoadPlanner):  # type: ignore[misc]
        def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
            # _EmptyStateDictLoadPlanner's, with zeros instead of torch.empty: a tensor whose chunks do not cover
            # it must not carry this process's stale memory into the saved step.
            from torch.distributed.checkpoint._traverse import set_element

            if state_dict or metadata is None:
                raise ManifestError(f"{path}: internal planner misuse")
            for k, v in metadata.state_dict_metadata.items():
                if isinstance(v, TensorStorageMetadata):
                    v = torch.zeros(v.size, dtype=v.properties.dtype)
                if metadata.planner_data is not None and k in metadata.planner_data:
                    set_element(state_dict, metadata.planner_data[k], v)
                else:
                    state_dict[k] = v
            DefaultLoadPlanner.set_up_planner(self, state_dict, metadata, is_coordinator)

        def load_bytes(self, read_item: Any, value: _pyio.BytesIO) -> None:
            if trusted:
                return super().load_bytes(read_item, value)
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise needs_trust(
                    UnsafeCheckpointError,
                    f"{path}: the value {read_item.dest_index.fqn!r} is a pickled Python object that "
                    f"torch.load(weights_only=True) refuses ({_weights_only_reason(e)})",
                ) from None
            except Exception as e:  # damaged bytes: torch's unpickler raises what it meets
                raise ManifestError(
                    f"{path}: the value {read_item.dest_index.fqn!r} is not readable: {type(e).__name__}: {e}"
                ) from None
            from torch.distributed.checkpoint._traverse import set_element

            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj
            return None

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    reader = SafeReader(path)
    try:
        reader.read_metadata()  # typed errors for a hostile or broken index, before DCP wraps them
    except CheckpointError:
        raise
    except Exception as e:  # trusted: DCP's own unpickling of a damaged file
        raise ManifestError(f"{meta_path} is not valid DCP metadata: {type(e).__name__}: {e}") from None
    state: dict[str, Any] = {}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            # The way torch's own dcp_to_torch_save reads a checkpoint without a model: dcp.load() would fill a
            # copy of the (empty) dict it is given.
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            _load_state_dict(state, storage_reader=SafeReader(path), planner=Planner(), no_dist=True)
        except CheckpointException as e:
            for failure in e.failures.values():
                exc = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(exc, CheckpointError):
                    raise exc from None
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ManifestError(f"{path} could not be read as a torch.distributed.checkpoint: {last}") from None
        except CheckpointError:
            raise
        except Exception as e:  # a damaged checkpoint: whatever DCP's reader raised outside its own wrapping
            raise ManifestError(
                f"{path} could not be read as a torch.distributed.checkpoint: {type(e).__name__}: {e}"
            ) from None
    return fix_optimizer_state_keys(state)


def _with_cli_message(err: CheckpointError, cli_message: str) -> CheckpointError:
    """``err`` with the message the CLI prints instead of ``str(err)`` (its flags rather than Python parameters)."""
    err.cli_message = cli_message  # type: ignore[attr-defined]
    return err


def _weights_only_reason(e: BaseException) -> str:
    """The part of torch's weights_only refusal that names what was refused (without its ANSI styling)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    at = text.find("WeightsUnpickler error:")
    if at >= 0:
        rest = [ln.strip() for ln in text[at + len("WeightsUnpickler error:") :].splitlines() if ln.strip()]
        if rest:
            return rest[0].split(". ")[0][:200]
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def _wants_globals(reason: str) -> bool:
    """Whether a weights_only refusal is about a Python object (a global) rather than damaged pickle data."""
    return "global" in reason.lower()


def fix_optimizer_state_keys(obj: Any) -> Any:
    """Turn ``{"state": {"0": ...}, "param_groups": [...]}`` string keys back into parameter indices (in place).

    torch.distributed.checkpoint stores optimizer state under string keys; ``Optimizer.load_state_dict`` matches
    integer ones and would silently drop the state otherwise.
    """
    if isinstance(obj, dict):
        st, groups = obj.get("state"), obj.get("param_groups")
        if (
            isinstance(st, dict)
            and isinstance(groups, list)
            and st
            and all(isinstance(k, str) and k.isdigit() for k in st)
            and all(isinstance(g, dict) and "params" in g for g in groups)
        ):
            obj["state"] = {int(k): v for k, v in st.items()}
        for v in obj.values():
            fix_optimizer_state_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            fix_optimizer_state_keys(v)
    return obj


def import_external(
    path: str | os.PathLike[str],
    mgr: Any,
    step: int,
    *,
    epoch: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    under: str | None = None,
    trusted: bool = False,
) -> Any:
    """Read a foreign checkpoint (see :func:`load_external`) and save it as ``step`` of ``mgr``.

    ``under`` nests the loaded object under that key (``under="model"`` turns a bare model state_dict into
    ``{"model": ...}``, ready for ``mgr.restore({"model": model})``). epoch/metrics default to what a
    ckptstore-exported safetensors file carries. The source path and format are added to ``metadata``.
    Returns the ``SaveResult``.

    Example::

        import_external("checkpoint.pth", mgr, step=5000, epoch=12, metrics={"loss": 0.31})
    """
    path = os.fspath(path)
    ext = load_external(path, trusted=trusted)
    state = ext.state if not under else {under: ext.state}
    meta = {"imported_from": os.path.abspath(path), "import_format": ext.format, **dict(metadata or {})}
    try:
        return mgr.save(
            step,
            state,
            epoch=epoch if epoch is not None else ext.epoch,
            metrics=dict(metrics) if metrics is not None else ext.metrics,
            metadata=meta,
            allow_pickle=trusted,
        )
    except UnsupportedValueError as e:
        if trusted or "without pickle" not in str(e):
            raise
        what = str(e).split(". ")[0]  # "cannot store a builtins.set at 's' without pickle"
        raise needs_trust(
            UnsupportedValueError,
            f"{path}: {what}",
            "Re-save it with tensors and plain values only, or pass {flag} to store such values pickled if you "
            "trust who wrote it (the step then loads only with trusted=True)",
        ) from None


# -- describing a step -------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of :func:`summarize`: a tensor (``entry`` set) or a value without tensors."""

    path: str
    key: str | None = None
    entry: TensorEntry | None = None
    value: Any = None


@dataclass
class Section:
    """A top-level entry of the saved state (``model``, ``optim``, …); ``cls`` is the saved object's class."""

    name: str | None
    cls: str | None
    rows: list[Row] = field(default_factory=list)


class _TensorRef:
    def __init__(self, e: TensorEntry | None) -> None:
        self.e = e

    def __repr__(self) -> str:
        if self.e is None:
            return "<tensor>"
        if self.e.encoding == "pickle":
            return f"<pickled object, {self.e.nbytes} bytes>"
        return f"<tensor {list(self.e.shape)} {self.e.dtype}>"


def _has_refs(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("t") in ("tensor", "pickle"):
            return True
        return any(_has_refs(v) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has_refs(v) for v in node)
    return False


def _value_of(m: Manifest, node: Any) -> Any:
    return unflatten(node, lambda key, n: _TensorRef(m.tensors.get(key)), rank=0)


def summarize(m: Manifest) -> list[Section]:
    """Describe a step like the tutorial's ``state_dict`` printout: per top-level entry, every tensor with shape
    and dtype, and every tensor-free value (e.g. an optimizer's ``param_groups``) as it would print.

    Example::

        for sec in summarize(mgr.manifest(1200)):
            for row in sec.rows:
                print(row.path, "\\t", torch.Size(row.entry.shape) if row.entry else row.value)
    """
    sections: list[Section] = []
    loose = Section(None, None)

    def emit(sec: Section, node: Any, parts: list[str]) -> None:
        while isinstance(node, dict) and node.get("t") == "stateful":
            node = node.get("v")
        path = "/".join(parts)
        if isinstance(node, dict):
            t = node.get("t")
            if t in ("tensor", "pickle"):
                key = node.get("key")
                sec.rows.append(Row(path or str(key), key, m.tensors.get(key)))
                return
            if t == "per_rank" and isinstance(node.get("v"), dict):
                for r, sub in node["v"].items():
                    emit(sec, sub, [*parts, f"[rank {r}]"])
                return
            if t == "dict" and _has_refs(node):
                for k, v in zip(node.get("k", []), node.get("v", [])):
                    emit(sec, v, [*parts, escape_part(str(k))])
                return
            if t in ("list", "tuple") and _has_refs(node):
                for i, v in enumerate(node.get("v", [])):
                    emit(sec, v, [*parts, str(i)])
                return
        sec.rows.append(Row(path, value=_value_of(m, node)))

    root = m.tree
    if isinstance(root, dict) and root.get("t") == "dict":
        for k, v in zip(root.get("k", []), root.get("v", [])):
            cls = v.get("cls") if isinstance(v, dict) and v.get("t") in ("stateful", "pickle") else None
            if _has_refs(v):
                sec = Section(str(k), cls)
                emit(sec, v, [])
                sections.append(sec)
            else:
                loose.rows.append(Row(escape_part(str(k)), value=_value_of(m, v)))
    else:
        sec = Section(None, root.get("cls") if isinstance(root, dict) else None)
        emit(sec, root, [])
        sections.append(sec)
    if loose.rows:
        sections.append(loose)
    return sections


def to_json_value(v: Any) -> Any:
    """A displayable value as strict JSON data (tuples as lists, dtypes/devices as strings, non-finite floats
    tagged like the manifest: ``{"$float": "nan"}``)."""
    if isinstance(v, _TensorRef):
        return repr(v)
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, torch.Size):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return encode_json(v)
    if isinstance(v, Mapping):
        return {str(k): to_json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


# -- diff -------------------------------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    key: str
    a: TensorEntry | None
    b: TensorEntry | None
    max_abs_diff: float | None = None
    """None when not computed (added/removed key, shape change, pickled objects)."""
    equal: bool | None = None

    @property
    def status(self) -> str:
        if self.a is None:
            return "added"
        if self.b is None:
            return "removed"
        if self.a.shape != self.b.shape:
            return "shape"
        if self.a.dtype != self.b.dtype:
            return "dtype"
        if self.a.encoding != self.b.encoding:
            return "encoding"
        return "equal" if self.equal else "changed"

    def to_dict(self) -> dict[str, Any]:
        def ent(e: TensorEntry | None) -> dict[str, Any] | None:
            return None if e is None else {"shape": list(e.shape), "dtype": e.dtype, "encoding": e.encoding}

        mad = self.max_abs_diff
        return {
            "key": self.key,
            "status": self.status,
            "a": ent(self.a),
            "b": ent(self.b),
            "max_abs_diff": encode_json(mad) if mad is not None else None,
            "equal": self.equal,
        }


@dataclass
class ValueDiff:
    path: str
    a: Any
    b: Any
    status: str  # "added" | "removed" | "changed"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "a": to_json_value(self.a), "b": to_json_value(self.b)}


@dataclass
class DiffResult:
    """What :func:`diff_steps` found. ``identical`` is about the saved state (tensors and values); changes of
    epoch, metrics and metadata are listed in ``info`` but do not count."""

    a: int
    b: int
    tensors: list[TensorDiff] = field(default_factory=list)
    values: list[ValueDiff] = field(default_factory=list)
    info: list[ValueDiff] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.values and all(t.status == "equal" for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        by = lambda s: [t.key for t in self.tensors if t.status == s]  # noqa: E731
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "added": by("added"),
            "removed": by("removed"),
            "changed": [t.to_dict() for t in self.tensors if t.status not in ("equal", "added", "removed")],
            "tensors": [t.to_dict() for t in self.tensors],
            "values": [v.to_dict() for v in self.values],
            "info": [v.to_dict() for v in self.info],
        }


def leaf_values(tree: Any) -> dict[str, Any]:
    """Every non-tensor leaf of a state tree by path (same path scheme as tensor keys)."""
    out: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            t = node.get("t")
            if t in ("tensor", "pickle"):
                return
            if t == "stateful":
                walk(node.get("v"), path)
                return
            if t == "per_rank" and isinstance(node.get("v"), dict):
                for r, sub in node["v"].items():
                    walk(sub, join_key(path, f"~rank{r}"))
                return
            if t == "dict":
                keys, vals = node.get("k", []), node.get("v", [])
                if not keys:
                    out[path] = {}
                for k, v in zip(keys, vals):
                    walk(v, join_key(path, k))
                return
            if t in ("list", "tuple"):
                vals = node.get("v", [])
                if not vals:
                    out[path] = [] if t == "list" else ()
                for i, v in enumerate(vals):
                    walk(v, join_key(path, i))
                return
        out[path] = unflatten(node, lambda key, n: None)

    walk(tree, "")
    return out


def _same(x: Any, y: Any) -> bool:
    if type(x) is not type(y) and not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
        return False
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(x == y)


def _diff_maps(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[ValueDiff]:
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        if k not in b:
            out.append(ValueDiff(k, a[k], None, "removed"))
        elif k not in a:
            out.append(ValueDiff(k, None, b[k], "added"))
        elif not _same(a[k], b[k]):
            out.append(ValueDiff(k, a[k], b[k], "changed"))
    return out


def max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest ``|x - y|`` over all elements (same shape), in chunks; NaN where exactly one side is NaN.

    Equal infinities and NaN against NaN count as equal.
    """
    if x.shape != y.shape:
        raise ValueError("max_abs_diff needs tensors of the same shape")
    if x.numel() == 0:
        return 0.0
    fx, fy = x.reshape(-1), y.reshape(-1)
    dt = torch.promote_types(x.dtype, y.dtype)
    if dt == torch.bool:
        dt = torch.uint8
    if dt.is_complex:
        work = torch.complex128
    elif dt.is_floating_point:
        work = torch.float64
    else:
        work = torch.int64
    best = 0.0
    for i in range(0, fx.numel(), _DIFF_CHUNK):
        a = fx[i : i + _DIFF_CHUNK].to(work)
        b = fy[i : i + _DIFF_CHUNK].to(work)
        eq = a == b
        if work != torch.int64:
            eq |= torch.isnan(a) & torch.isnan(b)
        d = (a - b).abs()
        d = torch.where(eq, torch.zeros((), dtype=d.dtype), d)
        if work != torch.int64 and bool(torch.isnan(d).any()):
            return float("nan")
        cur = float(d.max())
        best = max(best, cur)
    return best


def diff_steps(
    storage_a: Storage,
    m_a: Manifest,
    storage_b: Storage,
    m_b: Manifest,
    *,
    progress: Callable[[int], None] | None = None,
) -> DiffResult:
    """Compare two committed steps (possibly under different roots).

    Tensors with identical stored pieces (same crc32c and layout) are taken as equal without reading them;
    others are read one at a time (checksums verified) and their max abs difference computed. Pickled objects
    are compared as bytes and never unpickled.

    Example::

        d = diff_steps(mgr.storage, mgr.manifest(100), mgr.storage, mgr.manifest(200))
        print([t.key for t in d.tensors if t.status != "equal"])
    """
    res = DiffResult(m_a.step, m_b.step)
    keys = list(m_a.tensors) + [k for k in m_b.tensors if k not in m_a.tensors]
    for key in keys:
        ea, eb = m_a.tensors.get(key), m_b.tensors.get(key)
        td = TensorDiff(key, ea, eb)
        res.tensors.append(td)
        if ea is None or eb is None or ea.shape != eb.shape or ea.encoding != eb.encoding:
            continue
        # A part checked by its group's checksum is equal when the groups are and it sits at the same place in its
        # group (the group's bytes equal, so are the part's).
        sig_a = [(p.crc32c, p.nbytes, p.offsets, p.shape, p.start - p.checked[0], p.checked[1] - p.start)
                 for p in ea.pieces]  # fmt: skip
        sig_b = [(p.crc32c, p.nbytes, p.offsets, p.shape, p.start - p.checked[0], p.checked[1] - p.start)
                 for p in eb.pieces]  # fmt: skip
        if ea.dtype == eb.dtype and sig_a == sig_b:
            td.max_abs_diff, td.equal = 0.0, True
            continue
        ta = read_tensor(storage_a, m_a, key)
        tb = read_tensor(storage_b, m_b, key)
        if progress is not None:
            progress(ea.nbytes + eb.nbytes)
        if ea.encoding == "pickle":
            td.equal = torch.equal(ta, tb)
            continue
        td.max_abs_diff = max_abs_diff(ta, tb)
        td.equal = td.max_abs_diff == 0.0 and ea.dtype == eb.dtype
    res.values = _diff_maps(leaf_values(m_a.tree), leaf_values(m_b.tree))
    info_a = {"epoch": m_a.epoch, **{f"metrics/{k}": v for k, v in m_a.metrics.items()},
              **{f"metadata/{k}": v for k, v in m_a.metadata.items()}}  # fmt: skip
    info_b = {"epoch": m_b.epoch, **{f"metrics/{k}": v for k, v in m_b.metrics.items()},
              **{f"metadata/{k}": v for k, v in m_b.metadata.items()}}  # fmt: skip
    res.info = _diff_maps(info_a, info_b)
    return res


__all__ = [
    "DiffResult",
    "ExportResult",
    "External",
    "Section",
    "diff_steps",
    "export_step",
    "fix_optimizer_state_keys",
    "import_external",
    "leaf_values",
    "load_external",
    "max_abs_diff",
    "read_tensor",
    "select",
    "summarize",
    "to_json_value",
]
