"""Nested training state <-> (JSON tree, flat tensor table). Pure: no I/O, no collectives.

The tree keeps containers exactly (dict with str *and int* keys, list, tuple), JSON leaves (incl. inf/nan),
torch dtypes/devices/sizes, and references to tensors by flat key such as ``optim/state/0/exp_avg``. Objects
with ``state_dict()`` / ``load_state_dict()`` are stored as their state dict, tagged ``stateful``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ManifestError, UnsupportedValueError

#: Separator of flat keys; path parts containing it (or ``%``) are percent-escaped.
SEP = "/"
MAX_TREE_DEPTH = 200


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

    def add_tensor(key: str, t: torch.Tensor) -> dict[str, Any]:
        if key in flat.tensors or key in flat.pickles:
            raise UnsupportedValueError(f"two state entries map to the same key {key!r}; rename one of them")
        flat.tensors[key] = t
        return {"t": "tensor", "key": key}

    def walk(obj: Any, key: str, depth: int) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise UnsupportedValueError(f"state is nested deeper than {MAX_TREE_DEPTH} levels at {key!r}")
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized or getattr(obj, "is_nested", False):
                return refuse(obj, key, f"a {obj.layout} / quantized / nested tensor")
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


def tree_keys(node: Any) -> list[str]:
    """Every tensor/pickle key referenced by a tree, in order."""
    out: list[str] = []

    def walk(n: Any) -> None:
        if isinstance(n, dict):
            t = n.get("t")
            if t in ("tensor", "pickle"):
                out.append(n["key"])
            elif t in ("dict", "list", "tuple"):
                for v in n["v"]:
                    walk(v)
            elif t == "stateful":
                walk(n["v"])
            elif t == "per_rank":
                for v in n["v"].values():
                    walk(v)

    walk(node)
    return out


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
        return torch.device(str(node.get("v")))
    if t == "size":
        return torch.Size(node.get("v") or [])
    raise ManifestError(f"unknown state tree node type {t!r}")
