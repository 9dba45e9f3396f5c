"""The state-tree schema, in one place: nested training state <-> (JSON tree, flat tensor table), the checks of
a stored tree, and the node accessors every reader uses. Pure: no I/O, no collectives.

The tree keeps containers exactly (dict with str *and int* keys, list, tuple), JSON leaves (incl. inf/nan),
torch dtypes/devices/sizes, and references to tensors by flat key such as ``optim/state/0/exp_avg``. Objects
with ``state_dict()`` / ``load_state_dict()`` are stored as their state dict, tagged ``stateful``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ManifestError, UnsupportedValueError

#: Separator of flat keys; path parts containing it (or ``%``) are percent-escaped.
SEP = "/"
MAX_TREE_DEPTH = 200

#: The tensor dtypes ckptstore stores, by canonical name (``str(dtype)`` without ``torch.``): every dtype whose
#: storage holds exactly ``itemsize`` bytes per element, so ``numel * itemsize`` bytes fill a tensor exactly.
#: The 1..7-bit ``uint``/``int`` and the ``bits`` dtypes are one byte (``bits16``: two) per element in torch's
#: storage, as is ``float4_e2m1fn_x2`` (two fp4 values per element). Quantized dtypes (``qint8``, ``quint8``,
#: ``qint32``, ``quint4x2``, ``quint2x4``) are refused: their storage is not ``numel * itemsize`` bytes (packed) and
#: they carry scale/zero-point outside the bytes. Names a torch build lacks are left out.
STORABLE_DTYPE_NAMES: tuple[str, ...] = (
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
)  # fmt: skip


def _storable() -> dict[str, torch.dtype]:
    out = {}
    for name in STORABLE_DTYPE_NAMES:
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype) and str(dt) == f"torch.{name}":
            out[name] = dt
    return out


#: canonical name -> dtype, for the names of :data:`STORABLE_DTYPE_NAMES` this torch has.
STORABLE_DTYPES: dict[str, torch.dtype] = _storable()
_STORABLE_SET = frozenset(STORABLE_DTYPES.values())


def is_storable_dtype(dt: torch.dtype) -> bool:
    """Whether tensors of ``dt`` can be stored (and will be read back) as raw bytes."""
    return dt in _STORABLE_SET


class PerRank:
    """Marks a subtree whose value differs on every rank (RNG state, data-sampler position, ...).

    Each rank's value is stored separately and restored on the same rank.

    Example::

        mgr.save(step, {"model": model, "rng": PerRank(torch.get_rng_state())})
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


class Pickled:
    """Store this object with pickle, as a whole (e.g. the tutorial's "entire model" save).

    Needs ``allow_pickle=True`` at save; the step then loads only with ``trusted=True``, because unpickling
    runs code chosen by whoever wrote the checkpoint. Prefer state dicts.

    Example::

        mgr.save(step, {"model": Pickled(model)}, allow_pickle=True)
        model = mgr.load(step, trusted=True)["model"]
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def escape_part(part: str) -> str:
    return part.replace("%", "%25").replace(SEP, "%2F")


def join_key(prefix: str, part: object) -> str:
    p = escape_part(str(part))
    return f"{prefix}{SEP}{p}" if prefix else p


def is_stateful(obj: object) -> bool:
    return (
        not isinstance(obj, torch.Tensor)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def _class_name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


@dataclass
class Flat:
    """Result of :func:`flatten`."""

    tree: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    pickles: dict[str, Any] = field(default_factory=dict)


def _json_scalar(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    return v


def flatten(state: Any, *, rank: int = 0, allow_pickle: bool = False) -> Flat:
    """Split ``state`` into a JSON tree and a flat ``key -> tensor`` table.

    Unsupported leaves raise :class:`UnsupportedValueError` naming the key, unless ``allow_pickle`` is set,
    in which case they are recorded in ``Flat.pickles`` (and load only with ``trusted=True``).
    """
    flat = Flat(tree=None)
    first_key: dict[tuple[Any, ...], str] = {}

    def add_tensor(key: str, t: torch.Tensor) -> dict[str, Any]:
        if key in flat.tensors or key in flat.pickles:
            raise UnsupportedValueError(f"two state entries map to the same key {key!r}; rename one of them")
        # Tied weights (GPT-2's lm_head/wte) and other exact aliases are stored once: every later key refers
        # to the first one, and readers hand back one tensor for both, as torch.load re-ties shared storage.
        ident = _alias_id(t)
        if ident is not None:
            if ident in first_key:
                return {"t": "tensor", "key": first_key[ident]}
            first_key[ident] = key
        flat.tensors[key] = t
        return {"t": "tensor", "key": key}

    def walk(obj: Any, key: str, depth: int) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise UnsupportedValueError(f"state is nested deeper than {MAX_TREE_DEPTH} levels at {key!r}")
        if isinstance(obj, torch.Tensor):
            if getattr(obj, "is_nested", False):
                return refuse(obj, key, "a nested tensor")
            if obj.layout != torch.strided:
                return refuse(obj, key, f"a {obj.layout} tensor")
            if obj.is_quantized or obj.dtype not in _STORABLE_SET:
                return refuse(obj, key, f"a tensor of dtype {obj.dtype} (quantized and packed dtypes are not stored)")
            if obj.device.type == "meta":
                raise UnsupportedValueError(
                    f"cannot save the tensor at {key or '<root>'!r}: it is on the meta device and has no data. "
                    "Materialise the model first (e.g. model.to_empty(device='cpu') and initialise it, or restore "
                    "weights into it)"
                )
            return add_tensor(key or "tensor", obj)
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return _json_scalar(obj)
        if isinstance(obj, Pickled):
            return refuse(obj.value, key, f"a Pickled({_class_name(obj.value)})")
        if isinstance(obj, PerRank):
            return {"t": "per_rank", "v": {str(rank): walk(obj.value, join_key(key, f"~rank{rank}"), depth + 1)}}
        if isinstance(obj, torch.dtype):
            return {"t": "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"t": "device", "v": str(obj)}
        if isinstance(obj, torch.Size):
            return {"t": "size", "v": list(obj)}
        if isinstance(obj, Mapping):
            keys, vals = [], []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    return refuse(obj, key, f"a dict with a {type(k).__name__} key {k!r}")
                keys.append(k)
                vals.append(walk(v, join_key(key, k), depth + 1))
            return {"t": "dict", "k": keys, "v": vals}
        if isinstance(obj, list):
            return {"t": "list", "v": [walk(v, join_key(key, i), depth + 1) for i, v in enumerate(obj)]}
        if type(obj) is tuple:
            return {"t": "tuple", "v": [walk(v, join_key(key, i), depth + 1) for i, v in enumerate(obj)]}
        if is_stateful(obj):
            return {"t": "stateful", "cls": _class_name(obj), "v": walk(obj.state_dict(), key, depth + 1)}
        return refuse(obj, key, f"a {_class_name(obj)}")

    def refuse(obj: Any, key: str, what: str) -> Any:
        if not allow_pickle:
            raise UnsupportedValueError(
                f"cannot store {what} at {key or '<root>'!r} without pickle. Store tensors, containers, "
                "JSON values or objects with state_dict()/load_state_dict(); or pass allow_pickle=True "
                "(such a step then loads only with trusted=True)"
            )
        k = key or "object"
        if k in flat.tensors or k in flat.pickles:
            raise UnsupportedValueError(f"two state entries map to the same key {k!r}; rename one of them")
        flat.pickles[k] = obj
        return {"t": "pickle", "key": k, "cls": _class_name(obj)}

    flat.tree = walk(state, "", 0)
    return flat


def _alias_id(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of the memory ``t`` views (same address, dtype, shape and strides), or None when it has none."""
    local = getattr(t, "_local_tensor", t)  # a DTensor: its shard on this rank
    if local.numel() == 0:
        return None
    return (local.data_ptr(), local.dtype, local.device, local.shape, local.stride(), t.shape)


_FLOAT_TAGS = frozenset({"nan", "inf", "-inf"})


def check_tree(tree: Any, tensors: Mapping[str, Any], where: str = "manifest") -> None:
    """Validate a stored state tree against the manifest's tensor table; any problem is a ``ManifestError``.

    Checks every node: its type tag, container shapes (``k``/``v`` lists of the same length, dict keys ``str``
    or ``int``), references to tensors the manifest lists (with the matching encoding), dtype/device/size
    values, tagged floats, and the nesting depth — so that readers can walk the tree without guarding.
    """

    def bad(msg: str) -> ManifestError:
        return ManifestError(f"{where}: {msg}")

    def walk(n: Any, depth: int) -> None:
        if depth > MAX_TREE_DEPTH:
            raise bad(f"state tree is nested deeper than {MAX_TREE_DEPTH} levels")
        if n is None or isinstance(n, (bool, int, str)):
            return
        if isinstance(n, float):
            if not math.isfinite(n):
                raise bad("non-finite float in the state tree")
            return
        if not isinstance(n, dict):
            raise bad(f"invalid state tree node of type {type(n).__name__}")
        if "$float" in n and len(n) == 1:
            if n["$float"] not in _FLOAT_TAGS:
                raise bad(f"invalid tagged float {n['$float']!r}")
            return
        t = n.get("t")
        if t in ("tensor", "pickle"):
            key = n.get("key")
            if not isinstance(key, str):
                raise bad("tensor reference without a key in the state tree")
            e = tensors.get(key)
            if e is None:
                raise bad(f"the state tree refers to {key!r}, absent from tensors")
            if (t == "pickle") != (getattr(e, "encoding", "raw") == "pickle"):
                raise bad(f"{key!r} is a {t} in the state tree but {getattr(e, 'encoding', 'raw')} in tensors")
        elif t == "dict":
            keys, vals = n.get("k"), n.get("v")
            if not isinstance(keys, list) or not isinstance(vals, list) or len(keys) != len(vals):
                raise bad("malformed dict node in the state tree")
            for k in keys:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise bad(f"dict key {k!r} in the state tree is not a string or an integer")
            if len(set(keys)) != len(keys):
                raise bad("duplicate dict keys in the state tree")
            for v in vals:
                walk(v, depth + 1)
        elif t in ("list", "tuple"):
            vals = n.get("v")
            if not isinstance(vals, list):
                raise bad(f"malformed {t} node in the state tree")
            for v in vals:
                walk(v, depth + 1)
        elif t == "stateful":
            if "v" not in n:
                raise bad("malformed stateful node in the state tree")
            walk(n["v"], depth + 1)
        elif t == "per_rank":
            per = n.get("v")
            if not isinstance(per, dict) or not all(isinstance(r, str) and r.isdigit() for r in per):
                raise bad("malformed per_rank node in the state tree")
            for v in per.values():
                walk(v, depth + 1)
        elif t == "dtype":
            from .manifest import dtype_from_name

            dtype_from_name(n.get("v"))
        elif t == "device":
            check_device(n.get("v"), where)
        elif t == "size":
            v = n.get("v")
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
                raise bad(f"invalid torch.Size {v!r} in the state tree")
        else:
            raise bad(f"unknown state tree node type {t!r}")

    walk(tree, 0)


def check_device(v: Any, where: str = "manifest") -> torch.device:
    """A device string from a manifest, parsed (``ManifestError`` if torch cannot parse it)."""
    if not isinstance(v, str) or len(v) > 64:
        raise ManifestError(f"{where}: invalid device {v!r}")
    try:
        return torch.device(v)
    except (RuntimeError, ValueError, TypeError):
        raise ManifestError(f"{where}: invalid device {v!r}") from None


def unflatten(
    node: Any,
    get: Callable[[str, dict[str, Any]], Any],
    *,
    rank: int = 0,
    depth: int = 0,
) -> Any:
    """Rebuild Python values from a tree; ``get(key, node)`` supplies each tensor/pickle leaf."""
    if depth > MAX_TREE_DEPTH:
        raise ManifestError(f"state tree is nested deeper than {MAX_TREE_DEPTH} levels")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict):
        raise ManifestError(f"invalid state tree node of type {type(node).__name__}")
    if "$float" in node and len(node) == 1:
        if node["$float"] not in _FLOAT_TAGS:
            raise ManifestError(f"invalid tagged float {node['$float']!r} in the state tree")
        return float(node["$float"])
    t = node.get("t")
    if t in ("tensor", "pickle"):
        if not isinstance(node.get("key"), str):
            raise ManifestError("tensor reference without a key in the state tree")
        return get(node["key"], node)
    if t == "dict":
        keys, vals = node.get("k"), node.get("v")
        if not isinstance(keys, list) or not isinstance(vals, list) or len(keys) != len(vals):
            raise ManifestError("malformed dict node in the state tree")
        if not all(isinstance(k, (str, int)) for k in keys):
            raise ManifestError("malformed dict node in the state tree")
        return {k: unflatten(v, get, rank=rank, depth=depth + 1) for k, v in zip(keys, vals)}
    if t in ("list", "tuple"):
        vals = node.get("v")
        if not isinstance(vals, list):
            raise ManifestError(f"malformed {t} node in the state tree")
        items = [unflatten(v, get, rank=rank, depth=depth + 1) for v in vals]
        return items if t == "list" else tuple(items)
    if t == "stateful":
        return unflatten(node.get("v"), get, rank=rank, depth=depth + 1)
    if t == "per_rank":
        per = node.get("v")
        if not isinstance(per, dict):
            raise ManifestError("malformed per_rank node in the state tree")
        if str(rank) in per:
            return unflatten(per[str(rank)], get, rank=rank, depth=depth + 1)
        return None
    if t == "dtype":
        from .manifest import dtype_from_name

        return dtype_from_name(node.get("v"))
    if t == "device":
        return check_device(node.get("v"), "state tree")
    if t == "size":
        v = node.get("v") or []
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise ManifestError(f"invalid torch.Size {v!r} in the state tree")
        return torch.Size(v)
    raise ManifestError(f"unknown state tree node type {t!r}")


# -- node accessors: how readers of a stored tree see its nodes ----------------------------------------------------
def unwrap(node: Any, rank: int) -> Any:
    """``node`` without its ``stateful`` wrappers and with ``per_rank`` resolved to ``rank``'s value (None when
    the step holds no value of that rank)."""
    while isinstance(node, dict):
        t = node.get("t")
        if t == "stateful":
            node = node.get("v")
        elif t == "per_rank":
            per = node.get("v") or {}
            node = per.get(str(rank))
        else:
            break
    return node


def tensor_key(node: Any) -> str | None:
    """The manifest key a ``tensor`` node refers to, or None for any other node."""
    if isinstance(node, dict) and node.get("t") == "tensor" and isinstance(node.get("key"), str):
        return node["key"]
    return None


def dict_items(node: Any) -> dict[Any, Any] | None:
    """The children of a ``dict`` node by key, or None when ``node`` is not one."""
    if isinstance(node, dict) and node.get("t") == "dict":
        return dict(zip(node["k"], node["v"]))
    return None


def seq_items(node: Any) -> list[Any] | None:
    """The children of a ``list``/``tuple`` node, or None when ``node`` is neither."""
    if isinstance(node, dict) and node.get("t") in ("list", "tuple"):
        return list(node["v"])
    return None


def seq_kind(node: Any) -> type | None:
    """``list`` or ``tuple`` for a sequence node, else None."""
    t = node.get("t") if isinstance(node, dict) else None
    return list if t == "list" else tuple if t == "tuple" else None


def per_rank_keys(tree: Any) -> set[str]:
    """Keys of the tensors stored under ``PerRank`` nodes of a stored tree (each rank reads only its own)."""
    out: set[str] = set()

    def walk(n: Any, under: bool) -> None:
        if not isinstance(n, dict):
            return
        t = n.get("t")
        if t in ("tensor", "pickle"):
            if under and isinstance(n.get("key"), str):
                out.add(n["key"])
        elif t == "per_rank":
            for v in (n.get("v") or {}).values():
                walk(v, True)
        elif t in ("dict", "list", "tuple"):
            for v in n.get("v") or ():
                walk(v, under)
        elif t == "stateful":
            walk(n.get("v"), under)

    walk(tree, False)
    return out


def merge_trees(trees: Sequence[Any]) -> Any:
    """Rank 0's tree, with every rank's ``per_rank`` subtrees merged in (the tree a multi-rank manifest stores)."""
    return merge_per_rank(trees[0], [per_rank_values(t) for t in trees[1:]])


def per_rank_values(tree: Any) -> list[dict[str, Any]]:
    """The ``v`` of every ``per_rank`` node of a stored tree, in the order :func:`merge_per_rank` visits them:
    all a rank other than 0 adds to rank 0's tree (its ``PerRank`` values), a few bytes instead of the tree."""
    out: list[dict[str, Any]] = []

    def walk(n: Any) -> None:
        if not isinstance(n, dict):
            return
        t = n.get("t")
        if t == "per_rank":
            out.append(n.get("v") or {})
        elif t in ("dict", "list", "tuple"):
            for v in n.get("v") or ():
                walk(v)
        elif t == "stateful":
            walk(n.get("v"))

    walk(tree)
    return out


def merge_per_rank(base: Any, others: Sequence[Sequence[dict[str, Any]]]) -> Any:
    """``base`` (rank 0's tree) with the other ranks' :func:`per_rank_values` merged into its ``per_rank``
    nodes, node by node in walk order."""
    if not others:
        return base
    i = 0

    def merge(a: Any) -> Any:
        nonlocal i
        if not isinstance(a, dict):
            return a
        t = a.get("t")
        if t == "per_rank":
            merged = dict(a["v"])
            for o in others:
                if i < len(o) and isinstance(o[i], dict):
                    merged.update(o[i])
            i += 1
            return {"t": "per_rank", "v": dict(sorted(merged.items(), key=lambda kv: int(kv[0])))}
        if t in ("dict", "list", "tuple"):
            return {**a, "v": [merge(v) for v in a["v"]]}
        if t == "stateful":
            return {**a, "v": merge(a["v"])}
        return a

    return merge(base)
