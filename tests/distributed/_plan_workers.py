"""Rank bodies for tests/distributed/test_local_plans.py (module-level so spawn can pickle them by reference)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptstore import CheckpointManager, PerRank
from ckptstore.dist import TorchComm


def _record(log: list[tuple[str, str, int]]) -> None:
    """Wrap this process's collectives: (kind, what, pickled bytes sent) of each call."""
    for kind in ("gather", "broadcast", "all_gather"):
        orig = getattr(TorchComm, kind)

        def wrapped(self: Any, obj: Any, *, what: str = kind, _orig: Any = orig, _kind: str = kind) -> Any:
            log.append((_kind, what, len(pickle.dumps(obj))))
            return _orig(self, obj, what=what)

        setattr(TorchComm, kind, wrapped)


def _count_planning(calls: list[int]) -> None:
    import ckptstore.save.plans as plans

    orig = plans.plan_layout

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return orig(*a, **k)

    plans.plan_layout = counted  # type: ignore[assignment]


def _count_expanded(calls: list[int]) -> None:
    import ckptstore.save.protocol as protocol

    orig = protocol.expand

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return orig(*a, **k)

    protocol.expand = counted  # type: ignore[assignment]


def _full(v: Any) -> torch.Tensor:
    return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()


def _zero(v: Any) -> None:
    with torch.no_grad():
        (v.to_local() if hasattr(v, "to_local") else v).zero_()


def local_plans(rank: int, world: int, root: str, layers: int) -> dict[str, Any]:
    """DDP replicas + DTensor Shard(0) parts + a PerRank value: saves 1 and 2 (same structure), 3 (a tensor more),
    4 (a Shard(1) DTensor: not derivable from one rank's boxes). Returns each save's collectives and planning
    calls, and whether each step restores bit-exactly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # the same on every rank: the model's tensors are replicas
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(layers)])
    sharded = {f"s{i}": distribute_tensor(torch.randn(37 + i, 8), mesh, [Shard(0)]) for i in range(layers)}
    cols = distribute_tensor(torch.randn(6, 4 * world), mesh, [Shard(1)])
    log: list[tuple[str, str, int]] = []
    planned: list[int] = []
    _record(log)
    _count_planning(planned)
    expanded: list[int] = []
    _count_expanded(expanded)
    mgr = CheckpointManager(root)
    extras: list[dict[str, Any]] = [{}, {}, {"more": torch.arange(5.0)}, {"more": torch.arange(5.0), "cols": cols}]
    saves, refs = [], []
    for step, extra in enumerate(extras, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # alike on every rank: still replicas, but a new value per step
            for t in sharded.values():
                t.to_local().add_(1.0)
        state = {"model": model, "sharded": sharded, "rng": PerRank(torch.full((3 + rank,), step + rank / 10)), **extra}
        n0, p0 = len(log), len(planned)
        mgr.save(step, state)
        saves.append({"collectives": log[n0:], "planned": len(planned) - p0, "expanded": len(expanded)})
        ref = {f"model.{k}": _full(v) for k, v in model.state_dict().items()}
        ref.update({f"sharded.{k}": _full(v) for k, v in sharded.items()})
        ref.update({f"extra.{k}": _full(v) for k, v in extra.items()})
        refs.append(ref)
    exact = []
    for step, extra in enumerate(extras, start=1):
        for v in [*model.parameters(), *sharded.values(), *extra.values()]:
            _zero(v)
        mine = PerRank(torch.zeros(3 + rank))
        mgr.restore({"model": model, "sharded": sharded, "rng": mine, **extra}, step=step)
        got = {f"model.{k}": _full(v) for k, v in model.state_dict().items()}
        got.update({f"sharded.{k}": _full(v) for k, v in sharded.items()})
        got.update({f"extra.{k}": _full(v) for k, v in extra.items()})
        same = got.keys() == refs[step - 1].keys() and all(torch.equal(got[k], refs[step - 1][k]) for k in got)
        exact.append(same and torch.equal(mine.value, torch.full((3 + rank,), step + rank / 10)))
    mgr.close()
    manifest = next((Path(root) / "step-000000000001").glob("manifest*.json")).read_text()
    return {
        "saves": saves,
        "exact": exact,
        "layout": '"layout":{' in manifest,
        "chunk_rows": manifest.count('"chunk":'),
    }
