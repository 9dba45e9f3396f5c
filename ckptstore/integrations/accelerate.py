"""Accelerate adapter: ``accelerator.save_state`` / ``load_state`` through a ``CheckpointManager``.

``save_state(accelerator, mgr, step)`` commits, as ckptstore step ``step`` (local disk or ``s3://``), what
``Accelerator.save_state(dir)`` writes as a directory of pickles:

* ``models``: every prepared model's state dict (unwrapped: the same keys at any world size, no ``module.``);
* ``optimizers``, ``schedulers``: every prepared optimizer / scheduler; ``scaler``: the GradScaler (mixed
  precision) or None;
* ``dataloaders``: per prepared dataloader its ``state_dict()`` when it is stateful (``use_stateful_dataloader``),
  else the epoch and seed of accelerate's seedable sampler, if it uses one;
* ``custom``: the objects given to ``accelerator.register_for_checkpointing``;
* ``rng``: Python, NumPy, torch (CPU, CUDA) generator states, per rank (``PerRank``);
* ``accelerator``: ``accelerator.step`` (gradient accumulation position) and the save iteration.

``load_state(accelerator, mgr)`` puts the newest verified step (or ``step=N`` / ``"best"``) back into the same
objects, in place, then the RNG states, dataloader states and counters. Every rank of a distributed job calls
both with the same arguments (ckptstore's protocol: replicated tensors written once, RNG per rank).
Not covered: DeepSpeed, FSDP and Megatron-LM models (their engines write their own checkpoints; refused with
``ConfigError``).

Like ``Accelerator.save_state``, this reads the accelerator's registered objects (``accelerator._models``,
``_optimizers``, ``_schedulers``, ``_dataloaders``, ``_custom_objects``), which accelerate keeps private.

Example::

    from ckptstore import CheckpointManager
    from ckptstore.integrations.accelerate import load_state, save_state

    accelerator = Accelerator()
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    mgr = CheckpointManager("s3://bucket/run", retention={"keep_last": 3})
    start = load_state(accelerator, mgr).step if mgr.latest() else 0
    for step in range(start, total):
        ...
        if step % 500 == 0:
            save_state(accelerator, mgr, step, metrics={"loss": loss.item()})
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .. import CheckpointInfo, CheckpointManager, PendingSave, PerRank, SaveResult
from ..errors import ConfigError, StateMismatchError
from ._rng import rng_holder, rng_state, set_rng_state

log = logging.getLogger("ckptstore")

__all__ = ["load_state", "save_state"]

_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


def _check(accelerator: Accelerator) -> None:
    if not isinstance(accelerator, Accelerator):
        raise ConfigError(f"expected an accelerate.Accelerator, got {type(accelerator).__name__}")
    kind = accelerator.distributed_type
    if any(kind == getattr(DistributedType, name, None) for name in _UNSUPPORTED):
        raise ConfigError(
            f"ckptstore.integrations.accelerate does not support {kind} (its engine writes its own checkpoints); "
            "use accelerator.save_state for it"
        )


def _sampler(dl: Any) -> Any:
    from accelerate.data_loader import SeedableRandomSampler

    get = getattr(dl, "get_sampler", None)
    sampler = get() if callable(get) else None
    return sampler if isinstance(sampler, SeedableRandomSampler) else None


def _dataloader_state(dl: Any) -> dict[str, Any]:
    if getattr(dl, "use_stateful_dataloader", False):
        return {"state": dl.state_dict()}
    sampler = _sampler(dl)
    if sampler is not None:
        return {"sampler": {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}}
    return {}


def _state(accelerator: Accelerator) -> dict[str, Any]:
    return {
        "models": [accelerator.unwrap_model(m) for m in accelerator._models],
        "optimizers": list(accelerator._optimizers),
        "schedulers": list(accelerator._schedulers),
        "scaler": accelerator.scaler,
        "custom": list(accelerator._custom_objects),
    }


def save_state(
    accelerator: Accelerator,
    manager: CheckpointManager,
    step: int,
    *,
    epoch: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    blocking: bool | None = None,
) -> SaveResult | PendingSave:
    """Commit the accelerator's training state as ``step`` of ``manager`` (see the module doc for what is saved).

    ``blocking=False`` (or a manager built with ``async_save=True``) copies the state and writes it in the
    background; the returned :class:`ckptstore.PendingSave` tells when it is committed. Increments the save
    iteration like ``Accelerator.save_state``.

    Example::

        save_state(accelerator, mgr, step=global_step, epoch=epoch, metrics={"loss": 0.41})
    """
    _check(accelerator)
    state = _state(accelerator)
    if state["scaler"] is None:
        del state["scaler"]
    state["dataloaders"] = [_dataloader_state(dl) for dl in accelerator._dataloaders]
    state["rng"] = PerRank(rng_state())
    state["accelerator"] = {"step": int(accelerator.step), "iteration": int(accelerator.save_iteration)}
    meta = {"framework": "accelerate", "parts": sorted(state), **dict(metadata or {})}
    result = manager.save(step, state, epoch=epoch, metrics=metrics, metadata=meta, blocking=blocking)
    accelerator.project_configuration.iteration += 1
    return result


def load_state(
    accelerator: Accelerator,
    manager: CheckpointManager,
    step: int | str = "latest",
    *,
    map_location: Any = None,
    strict: bool = True,
) -> CheckpointInfo:
    """Restore a step written by :func:`save_state` into the accelerator's objects, in place; returns its info.

    ``step`` is ``"latest"`` (the newest step that verifies), ``"best"`` or a number. The same models,
    optimizers, schedulers and registered objects must be prepared, in the same order (else
    ``StateMismatchError``). The RNG states of this rank are restored when the step has them (with
    ``strict=False`` a rank that did not exist at save time keeps its own, listed in ``info.missing_per_rank``).

    Example::

        info = load_state(accelerator, mgr)          # newest verified step
        start_step = info.step + 1
    """
    _check(accelerator)
    target = _state(accelerator)
    if target["scaler"] is None:
        del target["scaler"]
    dls = list(accelerator._dataloaders)
    dl_states: list[dict[str, Any]] = [
        {"state": None} if getattr(dl, "use_stateful_dataloader", False) else {} for dl in dls
    ]
    for i, dl in enumerate(dls):
        if not dl_states[i] and _sampler(dl) is not None:
            dl_states[i] = {"sampler": {"epoch": None, "initial_seed": None}}
    counters: dict[str, Any] = {"step": None, "iteration": None}
    target["dataloaders"] = dl_states
    target["accelerator"] = counters
    rng = rng_holder()
    target["rng"] = PerRank(rng)
    try:
        info = manager.restore(target, step=step, map_location=map_location, strict=strict)
    except StateMismatchError as e:
        raise StateMismatchError(
            f"{e} (load_state needs the same models, optimizers, schedulers, dataloaders and registered objects, "
            "prepared in the same order, as when the step was saved)",
            missing=e.missing,
            unexpected=e.unexpected,
        ) from e
    if "rng" not in info.missing_per_rank and rng["cpu"] is not None:
        set_rng_state(rng)
    for dl, saved in zip(dls, dl_states):
        if saved.get("state") is not None:
            dl.load_state_dict(saved["state"])
        sampler_state = saved.get("sampler")
        if sampler_state and sampler_state.get("initial_seed") is not None:
            sampler = _sampler(dl)
            sampler.initial_seed = sampler_state["initial_seed"]
            sampler.set_epoch(sampler_state["epoch"])
    if counters["step"] is not None:
        accelerator.step = int(counters["step"])
    if counters["iteration"] is not None:
        accelerator.project_configuration.iteration = int(counters["iteration"]) + 1
    return info
