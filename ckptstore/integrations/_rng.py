"""Generator states (Python, NumPy, torch CPU/CUDA) as values ckptstore stores without pickle; no framework import.

Example::

    from ckptstore import PerRank
    from ckptstore.integrations._rng import rng_state, set_rng_state

    mgr.save(step, {"model": model, "rng": PerRank(rng_state())})
    set_rng_state(mgr.load(step)["rng"])
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger("ckptstore")

__all__ = ["rng_holder", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """This process's generator states as ckptstore-storable values (Python, NumPy, torch CPU; CUDA or None).

    Example::

        mgr.save(step, {"model": model, "rng": PerRank(rng_state())})
    """
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.array(np_state[1], dtype=np.uint32, copy=True)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "cpu": torch.random.get_rng_state(),
        "cuda": list(torch.cuda.random.get_rng_state_all()) if torch.cuda.is_available() else None,
    }
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned (or ``mgr.load(...)["rng"]`` gives back).

    Example::

        set_rng_state(mgr.load(step)["rng"])
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state.get("cuda"):
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.random.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint holds %d CUDA generator states but %d devices are visible: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def rng_holder() -> dict[str, Any]:
    """A target for ``restore`` of what :func:`rng_state` saved: the same keys, filled in by the restore."""
    return {"python": None, "numpy": None, "cpu": None, "cuda": None}
