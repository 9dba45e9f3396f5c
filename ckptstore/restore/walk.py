"""The restore walk: how a step's state tree meets the caller's objects, in two phases.

1. **Plan** (:func:`plan_restore`, :func:`plan_load`): walk the stored tree beside the target, register every read
   (into the existing tensors' memory where shapes, dtypes and layouts allow, else into CPU temporaries) and
   *defer* every change of the caller's objects (``load_state_dict``, dict/list assignments, device copies) as a
   closure in :attr:`ReadCtx.deferred`. Nothing the caller holds is changed, so a refusal (a state that does not
   fit) leaves it untouched.
2. **Commit** (:func:`apply_restore`): read every piece and verify its checksum, and only then run the deferred
   changes. A fresh value (``load()``) is finished by :func:`finalize` (device moves, trusted unpickling).

This is torch.distributed.checkpoint's ``resolve_tensor``/``commit_tensor`` in plain words. No collectives: the
caller runs each phase on every rank and agrees on the outcome (:mod:`ckptstore.restore.select`).

Example::

    rc = plan_restore(m, {"model": model}, storage=storage, strict=True)   # nothing changed yet
    apply_restore(rc, io)                                                   # read, verify, then change
"""

from __future__ import annotations

import io as _pyio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..dist import Comm
from ..errors import IntegrityError, ManifestError, StateMismatchError, UnsafeCheckpointError, UnsupportedValueError
from ..format.manifest import Manifest, Piece, TensorEntry, dtype_name, step_dir
from ..format.state import (
    PerRank,
    dict_items,
    is_stateful,
    per_rank_keys,
    seq_items,
    seq_kind,
    tensor_key,
    unflatten,
    unwrap,
)
from ..io import ReadTask, plan_fill, read_pieces, tensor_bytes, tensor_local_box, verify_views
from ..options import IOOptions
from ..storage import Storage

log = logging.getLogger("ckptstore")


@dataclass
class ReadCtx:
    """Everything one restore/load pass accumulates before any target is touched."""

    manifest: Manifest
    map_location: Any
    rank: int
    storage: Storage
    world_size: int = 1
    tasks: list[ReadTask] = field(default_factory=list)
    deferred: list[Callable[[], None]] = field(default_factory=list)
    moves: dict[int, torch.device] = field(default_factory=dict)
    pickles: dict[int, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warned_devices: set[str] = field(default_factory=set)
    map_files: bool = False
    """Fresh CPU tensors may be views of copy-on-write maps of the shard files (``load()`` on local disk)."""
    maps: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, Piece, memoryview]] = field(default_factory=list)
    """Pieces that are mapped, not read: only their checksums are checked."""
    written: dict[tuple[int, int], str] = field(default_factory=dict)
    """Target memory (address, bytes) that the reads overwrite before they are verified, by state path."""
    covered: set[tuple[int, int]] = field(default_factory=set)
    """Target memory this pass sets in full once it verified (read into directly or copied in afterwards)."""
    missing_per_rank: list[str] = field(default_factory=list)
    """PerRank targets for which the step holds no value of this rank (saved at another world size)."""
    filled: dict[tuple[int, int], str] = field(default_factory=dict)
    """Target memory already planned, by tensor key: a tied weight is read once, not once per name."""
    fresh_by_key: dict[str, torch.Tensor] = field(default_factory=dict)
    """Fresh tensors by key: keys stored once for several names (tied weights) come back as one tensor."""
    final: dict[int, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return step_dir(self.manifest.step)


def check_trust(m: Manifest, trusted: bool) -> None:
    if m.has_pickles and not trusted:
        keys = [k for k, t in m.tensors.items() if t.encoding == "pickle"]
        raise UnsafeCheckpointError(
            f"step {m.step} contains pickled objects ({', '.join(keys[:5])}); unpickling runs code from the "
            "checkpoint. Pass trusted=True only if you trust who wrote it"
        )


# -- load(): fresh values -------------------------------------------------------------------------------------------
def plan_load(m: Manifest, *, map_location: Any, trusted: bool, storage: Storage, rank: int, map_files: bool) -> Any:
    """Phase 1 of ``load()``: fresh (unfilled) values for the whole tree and their reads, in ``(rc, value)``."""
    check_trust(m, trusted)
    check_map_location(map_location)
    rc = ReadCtx(m, map_location, rank, storage, map_files=map_files)
    value = unflatten(m.tree, lambda key, node: fresh(rc, key), rank=rank)
    return rc, value


def load(m: Manifest, *, map_location: Any, trusted: bool, storage: Storage, rank: int, io: IOOptions) -> Any:
    """Read step ``m`` into fresh objects: plan, read and verify, then finish (device moves, unpickling)."""
    rc, value = plan_load(
        m, map_location=map_location, trusted=trusted, storage=storage, rank=rank, map_files=io.mmap_load
    )
    read_pieces(storage, rc.prefix, rc.tasks, io, step=m.step)
    verify_views(rc.mapped, io, step=m.step)
    return finalize(rc, value)


# -- restore(): into live objects -----------------------------------------------------------------------------------
def plan_restore(
    m: Manifest,
    state: Any,
    *,
    map_location: Any,
    strict: bool,
    trusted: bool,
    storage: Storage,
    rank: int = 0,
    world_size: int = 1,
    dirty: dict[tuple[int, int], str] | None = None,
) -> ReadCtx:
    """Phase 1 of a restore: plan every read into ``state`` and every deferred change; nothing is changed.

    ``dirty`` holds target memory that earlier failed attempts overwrote; the plan is refused unless it sets
    all of it again, and what its own reads will overwrite is added."""
    check_trust(m, trusted)
    check_map_location(map_location)
    rc = ReadCtx(m, map_location, rank, storage, world_size=world_size)
    if is_stateful(state) or isinstance(state, torch.Tensor):
        _into(rc, state, m.tree, "", strict)
    elif isinstance(state, Mapping):
        items = dict_items(unwrap(m.tree, 0))
        if items is None:
            raise StateMismatchError("'the checkpoint root' is a dict in the state but not in the checkpoint")
        for k in state:
            if k not in items:
                rc.missing.append(str(k))
                continue
            new = _into(rc, state[k], items[k], str(k), strict)
            if new is not state[k]:
                rc.deferred.append(_setter(state, k, new, rc))
    else:
        raise StateMismatchError(f"restore() takes a dict of state (or a Stateful object), got {type(state).__name__}")
    _check_fit(rc, strict)
    if dirty is not None:
        _check_dirty(rc, dirty)
        dirty.update(rc.written)
    return rc


def _check_fit(rc: ReadCtx, strict: bool) -> None:
    m = rc.manifest
    if rc.problems:
        raise StateMismatchError(
            f"step {m.step} does not fit the given state: " + "; ".join(rc.problems[:20]),
            missing=rc.missing,
            unexpected=rc.unexpected,
        )
    if not strict or not (rc.missing or rc.unexpected or rc.missing_per_rank):
        return
    parts = []
    if rc.missing:
        parts.append(f"missing from the checkpoint: {', '.join(rc.missing[:20])}")
    if rc.unexpected:
        parts.append(f"unexpected in the checkpoint: {', '.join(rc.unexpected[:20])}")
    if rc.missing_per_rank:
        parts.append(
            f"no saved PerRank value for rank {rc.rank} at {', '.join(rc.missing_per_rank[:20])} (saved at "
            f"world size {m.world_size}, restored at {rc.world_size}); keep data positions in a "
            "global cursor (ckptstore.elastic.ElasticSampler) to resume at another world size"
        )
    raise StateMismatchError(
        f"step {m.step} does not match the state (strict=True): "
        + "; ".join(parts)
        + ". Pass strict=False to restore what matches (PerRank values without a saved value are then "
        "left as they are and listed in the returned info's missing_per_rank)",
        missing=rc.missing + rc.missing_per_rank,
        unexpected=rc.unexpected,
    )


def _check_dirty(rc: ReadCtx, dirty: dict[tuple[int, int], str]) -> None:
    left = [path for region, path in dirty.items() if region not in rc.covered]
    if left:
        shown = ", ".join(repr(p) for p in left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise StateMismatchError(
            f"cannot fall back to step {rc.manifest.step}: a newer step that failed verification was already read "
            f"into {shown}, and step {rc.manifest.step} has no value for them, so the state would mix two steps. "
            "Nothing else was changed; re-create these objects (or restore a step that has them) before "
            "training on",
            missing=left,
        )


def apply_restore(rc: ReadCtx, io: IOOptions, comm: Comm | None = None) -> None:
    """Phase 2 of a restore: read and verify every piece, then make the deferred changes. With a distributed
    ``comm`` (every rank calls this), replicated pieces are read once per job and broadcast (``io.read_once``)."""
    if comm is not None and comm.is_distributed and io.read_once:
        from .shared import read_shared

        local = per_rank_keys(rc.manifest.tree)  # each rank's own values: never shared
        npieces = {k: len(e.pieces) for k, e in rc.manifest.tensors.items() if k not in local}
        read_shared(rc.storage, rc.prefix, rc.tasks, io, comm, npieces=npieces, step=rc.manifest.step)
    else:
        read_pieces(rc.storage, rc.prefix, rc.tasks, io, step=rc.manifest.step)
    for fn in rc.deferred:
        fn()


# The walk: register reads into existing tensors, create fresh values for the rest, and defer every mutation of
# the caller's objects until all reads have been verified.
def _into(rc: ReadCtx, tgt: Any, node: Any, path: str, strict: bool) -> Any:
    node = unwrap(node, rc.rank)
    if isinstance(tgt, PerRank):
        return _into_per_rank(rc, tgt, node, path, strict)
    if isinstance(tgt, torch.Tensor):
        key = tensor_key(node)
        if key is None:
            rc.problems.append(f"{path!r} is a tensor in the state but not in the checkpoint")
        else:
            fill_existing(rc, key, tgt, path)
        return tgt
    if is_stateful(tgt):
        if isinstance(tgt, torch.nn.Module):
            _into_module(rc, tgt, node, path, strict)
        else:
            _into_object(rc, tgt, node, path)
        return tgt
    if isinstance(tgt, dict):
        return _into_dict(rc, tgt, node, path, strict)
    if isinstance(tgt, list):
        return _into_list(rc, tgt, node, path, strict)
    if isinstance(tgt, tuple) and not isinstance(tgt, torch.Size):
        return _into_tuple(rc, tgt, node, path, strict)
    return fresh_tree(rc, node)


def _into_per_rank(rc: ReadCtx, tgt: PerRank, node: Any, path: str, strict: bool) -> PerRank:
    if node is None:
        rc.missing_per_rank.append(path or "<root>")
        return tgt
    new_inner = _into(rc, tgt.value, node, path, strict)
    rc.deferred.append(lambda: setattr(tgt, "value", finalize(rc, new_inner)))
    return tgt


def _items(rc: ReadCtx, node: Any, path: str) -> dict[Any, Any] | None:
    items = dict_items(unwrap(node, rc.rank))
    if items is None:
        rc.problems.append(f"{path!r} is a dict in the state but not in the checkpoint")
    return items


def _seq(rc: ReadCtx, node: Any, path: str) -> list[Any] | None:
    vals = seq_items(unwrap(node, rc.rank))
    if vals is None:
        rc.problems.append(f"{path!r} is a sequence in the state but not in the checkpoint")
    return vals


def _into_dict(rc: ReadCtx, tgt: dict[Any, Any], node: Any, path: str, strict: bool) -> dict[Any, Any]:
    items = _items(rc, node, path)
    if items is None:
        return tgt
    for k in list(tgt):
        if k not in items:
            rc.missing.append(f"{path}/{k}")
            continue
        new = _into(rc, tgt[k], items[k], f"{path}/{k}", strict)
        if new is not tgt[k]:
            rc.deferred.append(_setter(tgt, k, new, rc))
    for k, child in items.items():
        if k not in tgt:
            rc.deferred.append(_setter(tgt, k, fresh_tree(rc, child), rc))
    return tgt


def _into_list(rc: ReadCtx, tgt: list[Any], node: Any, path: str, strict: bool) -> list[Any]:
    vals = _seq(rc, node, path)
    if vals is None:
        return tgt
    if len(vals) != len(tgt) and strict:
        rc.problems.append(f"{path!r} has {len(tgt)} items in the state, {len(vals)} in the checkpoint")
        return tgt
    for i in range(min(len(vals), len(tgt))):
        new = _into(rc, tgt[i], vals[i], f"{path}/{i}", strict)
        if new is not tgt[i]:
            rc.deferred.append(_setter(tgt, i, new, rc))
    return tgt


def _into_tuple(rc: ReadCtx, tgt: tuple[Any, ...], node: Any, path: str, strict: bool) -> tuple[Any, ...]:
    vals = _seq(rc, node, path)
    if vals is None or len(vals) != len(tgt):
        if vals is not None:
            rc.problems.append(f"{path!r} has {len(tgt)} items in the state, {len(vals)} in the checkpoint")
        return tgt
    return tuple(_into(rc, t, v, f"{path}/{i}", strict) for i, (t, v) in enumerate(zip(tgt, vals)))


def _into_module(rc: ReadCtx, obj: torch.nn.Module, node: Any, path: str, strict: bool) -> None:
    """Read into the module's own tensors where its loading is plain ``copy_`` (the fast path), and hand fresh
    tensors to ``load_state_dict`` for the rest: submodules with their own ``_load_from_state_dict`` or a
    load-state-dict pre-hook (lazy modules, quantization observers, QAT fake-quant), and every tensor of a module
    on the meta device (then loaded with ``assign=True``, as ``load_state_dict(assign=True)`` would)."""
    cur = obj.state_dict(keep_vars=True)
    items = _items(rc, node, path)
    if items is None:
        return
    rc.missing += [f"{path}/{k}" if path else k for k in cur if k not in items]
    rc.unexpected += [f"{path}/{k}" if path else k for k in items if k not in cur]
    own = _own_loading(obj)
    assign = any(isinstance(v, torch.Tensor) and not _uninitialized(v) and v.is_meta for v in cur.values())
    new_sd: dict[str, Any] = {}
    for k, v in cur.items():
        if k not in items:
            continue
        if not isinstance(v, torch.Tensor):
            new_sd[k] = _Pending(fresh_tree(rc, items[k]))
            continue
        key = tensor_key(unwrap(items[k], rc.rank))
        if key is None:
            rc.problems.append(f"{path}/{k}: a tensor in the model, not in the checkpoint")
            continue
        if assign or _uninitialized(v) or _owned(k, own):
            new_sd[k] = _Pending(fresh_tree(rc, items[k]))  # the module's own loading logic takes it from here
            continue
        fill_existing(rc, key, v.detach() if v.requires_grad else v, f"{path}/{k}")
        new_sd[k] = v
    for k in items:
        if k not in cur and not strict:
            new_sd.setdefault(k, _Pending(fresh_tree(rc, items[k])))

    def load_module() -> None:
        sd = {k: (finalize(rc, v.value) if isinstance(v, _Pending) else v) for k, v in new_sd.items()}
        try:
            obj.load_state_dict(sd, strict=strict, assign=assign)
        except (RuntimeError, ValueError) as e:
            raise StateMismatchError(f"{path or 'model'}: load_state_dict failed: {e}") from None

    rc.deferred.append(load_module)


def _uninitialized(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.parameter.UninitializedTensorMixin)


def _own_loading(module: torch.nn.Module) -> frozenset[str]:
    """Names of the submodules (``""``: the module itself) that load their state their own way."""
    base = torch.nn.Module._load_from_state_dict
    return frozenset(
        name
        for name, m in module.named_modules()
        if type(m)._load_from_state_dict is not base or m._load_state_dict_pre_hooks
    )


def _owned(key: str, own: frozenset[str]) -> bool:
    """Is state-dict entry ``key`` loaded by one of the submodules in ``own`` (itself or an ancestor)?"""
    if not own:
        return False
    if "" in own:
        return True
    parts = key.split(".")[:-1]
    return any(".".join(parts[: i + 1]) in own for i in range(len(parts)))


def _into_object(rc: ReadCtx, obj: Any, node: Any, path: str) -> None:
    """Optimizers, schedulers, GradScaler, user Stateful: build the full state dict from the checkpoint, reading
    into tensors the object already has where paths and shapes line up."""
    new_value = _build(rc, node, obj.state_dict())

    def load_obj() -> None:
        sd = finalize(rc, new_value)
        try:
            obj.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise StateMismatchError(f"{path}: {type(obj).__name__}.load_state_dict failed: {e}") from None

    rc.deferred.append(load_obj)


def _build(rc: ReadCtx, node: Any, hint: Any) -> Any:
    node = unwrap(node, rc.rank)
    items = dict_items(node)
    if items is not None:
        hint_d = hint if isinstance(hint, Mapping) else {}
        return {k: _build(rc, v, hint_d.get(k)) for k, v in items.items()}
    kind = seq_kind(node)
    if kind is not None:
        hint_l = hint if isinstance(hint, (list, tuple)) else []
        vals = [_build(rc, v, hint_l[i] if i < len(hint_l) else None) for i, v in enumerate(seq_items(node) or [])]
        return vals if kind is list else tuple(vals)
    key = tensor_key(node)
    if key is not None and isinstance(hint, torch.Tensor):
        entry = rc.manifest.tensors.get(key)
        if entry is not None and entry.encoding == "raw" and tuple(hint.shape) == entry.shape:
            fill_existing(rc, key, hint.detach(), key)
            return hint
    return fresh_tree(rc, node)


class _Pending:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _setter(container: Any, k: Any, new: Any, rc: ReadCtx) -> Callable[[], None]:
    def run() -> None:
        container[k] = finalize(rc, new)

    return run


# -- tensors: fresh ones, existing ones ----------------------------------------------------------------------------
def fresh_tree(rc: ReadCtx, node: Any) -> Any:
    return unflatten(node, lambda key, n: fresh(rc, key), rank=rc.rank)


def _entry(rc: ReadCtx, key: str) -> TensorEntry:
    e = rc.manifest.tensors.get(key)
    if e is None:
        raise ManifestError(f"step {rc.manifest.step}: the state tree refers to {key!r}, absent from tensors")
    return e


def fresh(rc: ReadCtx, key: str) -> torch.Tensor:
    """A new tensor for manifest entry ``key``, with its reads registered (or a view of a mapped shard file).
    A key asked for again (a tied weight stored once) gives the same tensor."""
    got = rc.fresh_by_key.get(key)
    if got is not None:
        return got
    t = _fresh(rc, key)
    if id(t) not in rc.pickles:
        rc.fresh_by_key[key] = t
    return t


def _fresh(rc: ReadCtx, key: str) -> torch.Tensor:
    e = _entry(rc, key)
    dt = e.torch_dtype
    if e.encoding == "pickle":
        buf = _alloc(rc, key, e, torch.uint8)
        rc.tasks.extend(plan_fill(key, e, buf))
        rc.pickles[id(buf)] = key
        return buf
    dev = resolve_device(rc, key, e)
    if dev.type == "meta":
        return torch.empty(e.shape, dtype=dt, device="meta")
    if rc.map_files and dev.type == "cpu":
        mapped = _map_piece(rc, key, e, dt)
        if mapped is not None:
            return mapped
    t = _alloc(rc, key, e, dt)
    rc.tasks.extend(plan_fill(key, e, t))
    if dev.type != "cpu":
        rc.moves[id(t)] = dev
    return t


def _map_piece(rc: ReadCtx, key: str, e: TensorEntry, dt: torch.dtype) -> torch.Tensor | None:
    """A tensor viewing its bytes in a copy-on-write map of the shard file, or None (then it is read)."""
    if len(e.pieces) != 1:
        return None
    p = e.pieces[0]
    itemsize = dt.itemsize
    numel = math.prod(e.shape)
    if p.offsets is not None or p.span is not None or not numel or p.nbytes != numel * itemsize or p.start % itemsize:
        return None
    if p.file not in rc.maps:
        try:
            rc.maps[p.file] = rc.storage.map_private(f"{rc.prefix}/{p.file}")
        except (OSError, ValueError):
            rc.maps[p.file] = None  # missing or unmappable: the read path reports it precisely
    mm = rc.maps[p.file]
    if mm is None:
        return None
    if p.end > len(mm):
        raise IntegrityError(
            f"step {rc.manifest.step}: file {p.file} is shorter than the manifest says ({len(mm)} bytes, "
            f"key {key!r} ends at {p.end})",
            step=rc.manifest.step,
            file=p.file,
            key=key,
        )
    t = torch.frombuffer(mm, dtype=dt, count=numel, offset=p.start).view(e.shape)
    rc.mapped.append((key, p, tensor_bytes(t)))
    return t


def _alloc(rc: ReadCtx, key: str, e: TensorEntry, dt: torch.dtype) -> torch.Tensor:
    """``torch.empty`` for a tensor the manifest describes. When that fails, a manifest claiming more bytes
    than its files hold (damaged or hostile) is reported as such, not as the allocator's RuntimeError."""
    try:
        return torch.empty(e.shape, dtype=dt)
    except (RuntimeError, MemoryError) as err:
        for p in e.pieces:
            try:
                size = rc.storage.size(f"{rc.prefix}/{p.file}")
            except OSError:
                continue
            if size < p.end:
                raise ManifestError(
                    f"step {rc.manifest.step}: tensor {key!r} ({dtype_name(dt)}{list(e.shape)}, {e.nbytes} bytes) "
                    f"claims bytes {p.start}-{p.end} of {p.file}, which holds {size}: the manifest is damaged; "
                    "nothing was allocated"
                ) from None
        raise err


def fill_existing(rc: ReadCtx, key: str, tgt: torch.Tensor, path: str) -> None:
    """Register reads of ``key`` into the memory of ``tgt`` (or a CPU temporary copied in once verified)."""
    e = _entry(rc, key)
    if e.encoding != "raw":
        rc.problems.append(f"{path!r} is a tensor in the state but a pickled object in the checkpoint")
        return
    if tgt.requires_grad:
        tgt = tgt.detach()  # same memory; a copy into a leaf that requires grad would be an autograd error
    local, gshape, offs = tensor_local_box(tgt)
    if gshape != e.shape:
        rc.problems.append(f"{path!r}: shape {list(gshape)} in the state, {list(e.shape)} in the checkpoint")
        return
    if local.device.type == "meta":
        return
    dt = e.torch_dtype
    region = (local.data_ptr(), local.numel() * local.element_size())
    if rc.filled.get(region) == key:
        return  # a tied weight under a second name: the same bytes into the same memory, planned once
    rc.filled[region] = key
    rc.covered.add(region)
    if local.device.type == "cpu" and local.is_contiguous() and local.dtype == dt:
        rc.written[region] = path
        rc.tasks.extend(plan_fill(key, e, local, offs))
        return
    # Different device, dtype or layout: read into a CPU temporary, copy once everything verified.
    tmp = torch.empty(tuple(local.shape), dtype=dt)
    rc.tasks.extend(plan_fill(key, e, tmp, offs))
    rc.deferred.append(lambda: local.copy_(tmp))


def finalize(rc: ReadCtx, value: Any) -> Any:
    """A planned value made final once its reads verified: device moves done, trusted pickles loaded."""
    if isinstance(value, torch.Tensor):
        done = rc.final.get(id(value))
        if done is not None:
            return done  # one tensor in several places (tied weights): finished once, still one tensor
        out = _finalize_tensor(rc, value)
        rc.final[id(value)] = out
        return out
    if isinstance(value, dict):
        return {k: finalize(rc, v) for k, v in value.items()}
    if isinstance(value, list):
        return [finalize(rc, v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(finalize(rc, v) for v in value)
    return value


def _finalize_tensor(rc: ReadCtx, value: torch.Tensor) -> Any:
    if id(value) in rc.pickles:
        dev = rc.map_location if isinstance(rc.map_location, (str, torch.device)) else None
        # Trusted by the caller (checked in check_trust): this is the one place ckptstore unpickles.
        return torch.load(_pyio.BytesIO(value.numpy().tobytes()), map_location=dev, weights_only=False)
    dev = rc.moves.get(id(value))
    return value.to(dev) if dev is not None else value


# -- map_location ----------------------------------------------------------------------------------------------------
def _device_ok(dev: torch.device) -> bool:
    if dev.type in ("cpu", "meta"):
        return True
    mod = getattr(torch, dev.type, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # some backends raise on is_available without drivers
        return False


def unavailable_device(dev: torch.device) -> UnsupportedValueError:
    return UnsupportedValueError(
        f"map_location asks for device {dev}, which is not available here (torch.{dev.type}.is_available() is "
        "False), as torch.load would refuse it; pass map_location='cpu' (or a mapping to a device this machine "
        "has)"
    )


def check_map_location(ml: Any) -> None:
    """Refuse up front a ``map_location`` naming a device this machine lacks (as ``torch.load`` does), also for
    a restore into existing tensors, which keep their device; a callable is checked per tensor."""
    if isinstance(ml, Mapping):
        wanted = list(ml.values())
    elif isinstance(ml, (str, torch.device)):
        wanted = [ml]
    else:
        return
    for d in wanted:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError, ValueError):
            raise UnsupportedValueError(f"map_location names an invalid device {d!r}") from None
        if not _device_ok(dev):
            raise unavailable_device(dev)


def _call_map_location(ml: Callable[..., Any], key: str, e: TensorEntry) -> Any:
    import inspect

    try:
        first = next(iter(inspect.signature(ml).parameters), "")
    except (TypeError, ValueError):
        first = ""
    if first == "key":
        return ml(key, torch.empty(e.shape, dtype=e.torch_dtype, device="meta"))
    res = ml(torch.UntypedStorage(0), e.device)  # torch.load convention: fn(storage, location) -> storage | None
    return e.device if res is None else getattr(res, "device", res)


def resolve_device(rc: ReadCtx, key: str, e: TensorEntry) -> torch.device:
    """Where ``map_location`` puts tensor ``key`` (CPU, with one warning per device, when that is not here)."""
    ml = rc.map_location
    saved = e.device
    dev: Any
    if ml is None:
        dev = saved
    elif isinstance(ml, (str, torch.device)):
        dev = ml
    elif isinstance(ml, Mapping):
        dev = ml.get(saved, ml.get(torch.device(saved), saved)) if saved else saved
    elif callable(ml):
        dev = _call_map_location(ml, key, e)
    else:
        raise UnsupportedValueError(f"map_location must be None, str, torch.device, dict or callable, got {ml!r}")
    dev = torch.device(dev)
    if not _device_ok(dev):
        if ml is not None:
            raise unavailable_device(dev)
        if str(dev) not in rc.warned_devices:
            log.warning("device %s is not available here; loading to cpu instead", dev)
            rc.warned_devices.add(str(dev))
        dev = torch.device("cpu")
    return dev
