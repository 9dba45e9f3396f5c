"""transformers ``Trainer`` adapter: checkpoints saved through a ``CheckpointManager`` and resumed from it.

``CkptstoreTrainer`` is a ``transformers.Trainer`` (``CkptstoreTrainerMixin`` mixes into any ``Trainer``
subclass, e.g. ``Seq2SeqTrainer`` or trl's trainers: put the mixin first). Where the Trainer would write
``output_dir/checkpoint-N/`` (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``, ``scaler.pt``), it commits step ``N`` of the manager instead — local disk or ``s3://``:

* ``model``: the model's state dict (tensors, tied weights kept as in ``state_dict()``);
* ``optimizer``, ``scheduler`` and (mixed precision) ``scaler``: their state dicts;
* ``rng``: Python, NumPy, torch CPU (and CUDA) generator states, per rank (``PerRank``);
* the ``TrainerState`` (``trainer_state.json``'s content, with ``stateful_callbacks``) in the step's metadata.

``train(resume_from_checkpoint=True)`` resumes from the manager's newest step (``N`` or a step's URL picks one;
a path to a regular Hugging Face ``checkpoint-N`` directory is resumed by the Trainer as before, and ``True``
falls back to those when the manager has no step yet). The Trainer's own resume logic runs unchanged — data
skipping, RNG re-sync after the skipped batches, callback state — reading a small temporary directory holding only
the step's ``trainer_state.json``; model, optimizer, scheduler, scaler and RNG come from ckptstore, read straight
into the existing tensors. ``save_total_limit`` removes older steps (never the best one), and
``load_best_model_at_end`` restores the best step's model from ckptstore.

``blocking=False`` saves asynchronously (the state is copied at the save step and written in the background; the
last save is waited for when ``train()`` returns).

Not covered: DeepSpeed, FSDP and SageMaker model parallel (their engines write their own sharded checkpoints;
the mixin refuses them with ``ConfigError``), and TPU/XLA.

Example::

    from ckptstore import CheckpointManager
    from ckptstore.integrations.transformers import CkptstoreTrainer

    mgr = CheckpointManager("s3://bucket/run-7", storage_options={...})
    trainer = CkptstoreTrainer(model=model, args=TrainingArguments("out", save_steps=500), train_dataset=ds,
                               checkpoint_manager=mgr)
    trainer.train(resume_from_checkpoint=True)     # newest step of s3://bucket/run-7, or a fresh start
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState

from .. import CheckpointManager, PendingSave, PerRank
from ..errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError
from ..format.manifest import step_dir
from ._rng import rng_holder, rng_state, set_rng_state

log = logging.getLogger("ckptstore")

__all__ = ["CkptstoreTrainer", "CkptstoreTrainerMixin", "rng_state", "set_rng_state"]

TRAINER_STATE_NAME = "trainer_state.json"
_META_KEY = "hf_trainer_state"


class CkptstoreTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first) to save and resume through a ``CheckpointManager``.

    Keyword arguments (the rest goes to the Trainer): ``checkpoint_manager`` (a :class:`CheckpointManager`), or
    ``checkpoint_root`` + ``storage_options`` to build one (default root: ``<output_dir>/ckptstore``);
    ``blocking`` (default True) for synchronous saves. See the module doc for what is saved.

    Example::

        class MyTrainer(CkptstoreTrainerMixin, Seq2SeqTrainer):
            pass

        MyTrainer(model=m, args=args, train_dataset=ds, checkpoint_root="s3://b/run").train(
            resume_from_checkpoint=True)
    """

    def __init__(
        self,
        *args: Any,
        checkpoint_manager: CheckpointManager | None = None,
        checkpoint_root: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        blocking: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if checkpoint_manager is not None and (checkpoint_root is not None or storage_options is not None):
            raise ConfigError("pass either checkpoint_manager or checkpoint_root (+ storage_options), not both")
        if not isinstance(blocking, bool):
            raise ConfigError(f"blocking must be True or False, got {blocking!r}")
        hf: Any = self
        if checkpoint_manager is None:
            root = checkpoint_root if checkpoint_root is not None else os.path.join(hf.args.output_dir, "ckptstore")
            checkpoint_manager = CheckpointManager(root, storage_options=storage_options)
        self.checkpoint_manager: CheckpointManager = checkpoint_manager
        self.checkpoint_blocking = blocking
        self._ckptstore_resume: tuple[str, int] | None = None  # (stub directory, step) while resuming
        self._ckptstore_rng: dict[str, Any] | None = None
        self._ckptstore_pending: PendingSave | None = None

    # -- saving -------------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        hf: Any = self
        for flag in ("is_deepspeed_enabled", "is_fsdp_enabled", "is_fsdp_xla_enabled"):
            if getattr(hf, flag, False):
                raise ConfigError(
                    f"CkptstoreTrainer does not support {flag[3:-8]} (its engine writes its own sharded checkpoints); "
                    "use the plain Trainer, or save with CheckpointManager and torch.distributed.checkpoint state dicts"
                )

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Commit the training state as step ``global_step`` of the manager (replaces ``checkpoint-N/``)."""
        hf: Any = self
        self._check_supported()
        self._ckptstore_wait()
        mgr = self.checkpoint_manager
        step = int(hf.state.global_step)
        if hf.hp_search_backend is None and trial is None:
            hf.store_flos()
        best = hf.state.best_global_step
        if best:  # the Trainer points this at checkpoint-<best>/; here it is that step's prefix
            hf.state.best_model_checkpoint = f"{mgr.url.rstrip('/')}/{step_dir(best)}"
        if hf.args.should_save:  # what the Trainer does before writing trainer_state.json
            for cb in [c for c in [*hf.callback_handler.callbacks, hf.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(hf.state.stateful_callbacks[name], list):
                    hf.state.stateful_callbacks[name].append(cb.state())
                else:
                    hf.state.stateful_callbacks[name] = cb.state()
        unwrapped = hf.accelerator.unwrap_model(hf.model)
        state: dict[str, Any] = {"model": unwrapped}
        if not hf.args.save_only_model:
            state["optimizer"] = hf.optimizer
            state["scheduler"] = hf.lr_scheduler
            scaler = getattr(hf.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            state["rng"] = PerRank(rng_state())
        # exactly what trainer_state.json would hold (the Trainer's save_to_json: asdict + json.dumps)
        trainer_state = json.loads(json.dumps(dataclasses.asdict(hf.state)))
        try:
            result = mgr.save(
                step,
                state,
                epoch=int(hf.state.epoch) if hf.state.epoch is not None else None,
                metrics=_finite_metrics(hf.state.log_history[-1] if hf.state.log_history else {}),
                metadata={"framework": "transformers", "parts": sorted(state), _META_KEY: trainer_state},
                blocking=self.checkpoint_blocking,
            )
        except CheckpointExistsError as e:
            raise CheckpointExistsError(
                f"{e} -- {mgr.url} already holds step {step} of an earlier run, and ckptstore never overwrites a "
                "committed step: resume it with train(resume_from_checkpoint=True), or give this run another "
                "checkpoint_root",
                step=step,
            ) from e
        if isinstance(result, PendingSave):
            self._ckptstore_pending = result
        else:
            self._ckptstore_rotate()

    def _ckptstore_wait(self) -> None:
        pending, self._ckptstore_pending = self._ckptstore_pending, None
        if pending is not None:
            pending.wait()
            self._ckptstore_rotate()

    def _ckptstore_rotate(self) -> None:
        """``save_total_limit``: keep the newest steps and the best one, like the Trainer's own rotation."""
        hf: Any = self
        limit = hf.args.save_total_limit
        if not limit or limit <= 0 or not hf.args.should_save:
            return
        mgr = self.checkpoint_manager
        steps = mgr.steps()
        best = hf.state.best_global_step
        if best in steps:  # the Trainer's rule: the best counts towards the limit, plus the newest when limit is 1
            others = [s for s in steps if s != best]
            n = max(limit - 1, 1) if best != steps[-1] else limit - 1
            keep = {best, *(others[-n:] if n else [])}
        else:
            keep = set(steps[-limit:])
        for s in steps:
            if s not in keep:
                mgr.delete(s)

    # -- resuming -----------------------------------------------------------------------------------------
    def _resolve_step(self, resume: Any) -> int | None:
        mgr = self.checkpoint_manager
        if resume is True:
            latest = mgr.latest()
            return latest.step if latest is not None else None
        if isinstance(resume, int) and not isinstance(resume, bool):
            mgr.info(resume)  # CheckpointNotFoundError naming the committed steps
            return resume
        if isinstance(resume, (str, os.PathLike)):
            p = os.fspath(resume)
            if os.path.isfile(os.path.join(p, TRAINER_STATE_NAME)):
                return None  # a regular Hugging Face checkpoint directory: the Trainer's own path
            want = _norm_url(p)
            for s in mgr.steps():
                if _norm_url(mgr.info(s).url) == want:
                    return s
            raise CheckpointNotFoundError(
                f"resume_from_checkpoint={p!r} is neither a Hugging Face checkpoint directory nor a step of "
                f"{mgr.url} (committed steps: {mgr.steps()}); pass True for the newest step or a step number"
            )
        raise ConfigError(f"resume_from_checkpoint must be True, a step number or a path, got {resume!r}")

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, **kwargs: Any) -> Any:
        """``Trainer.train``, resuming from the manager when ``resume_from_checkpoint`` is True, a step number or a
        step's URL (see the module doc). Waits for an asynchronous last save before returning.

        Example::

            trainer.train(resume_from_checkpoint=True)
        """
        hf: Any = self
        self._check_supported()
        step = None
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            step = self._resolve_step(resume_from_checkpoint)
            if step is None and resume_from_checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                if not os.path.isdir(hf.args.output_dir) or get_last_checkpoint(hf.args.output_dir) is None:
                    raise CheckpointNotFoundError(
                        f"resume_from_checkpoint=True but {self.checkpoint_manager.url} has no committed step (and "
                        f"{hf.args.output_dir} no checkpoint-N directory); start without resume_from_checkpoint"
                    )
        elif hf.args.should_save and hf.args.save_strategy != "no":
            existing = self.checkpoint_manager.steps()
            if existing:
                raise CheckpointExistsError(
                    f"{self.checkpoint_manager.url} already holds steps {existing} of an earlier run, and ckptstore "
                    "never overwrites a committed step: resume with train(resume_from_checkpoint=True), give this run "
                    "another checkpoint_root, or delete those steps (ckptstore prune / CheckpointManager.delete)",
                    step=existing[-1],
                )
        stub = None
        try:
            if step is not None:
                info = self.checkpoint_manager.info(step)
                trainer_state = info.metadata.get(_META_KEY)
                if not isinstance(trainer_state, dict):
                    raise ConfigError(
                        f"step {step} of {self.checkpoint_manager.url} was not saved by CkptstoreTrainer (its metadata "
                        f"has no {_META_KEY!r}); restore it with CheckpointManager.restore instead"
                    )
                stub = tempfile.mkdtemp(prefix="ckptstore-resume-")
                if trainer_state.get("best_model_checkpoint") is not None:
                    trainer_state["best_model_checkpoint"] = stub  # a directory the Trainer's check finds
                with open(os.path.join(stub, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                    json.dump(trainer_state, f)
                self._ckptstore_resume = (stub, step)
                resume_from_checkpoint = stub
            out = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)  # type: ignore[misc]
            self._ckptstore_wait()
            return out
        finally:
            self._ckptstore_resume = None
            self._ckptstore_rng = None
            if stub is not None:
                shutil.rmtree(stub, ignore_errors=True)

    def _resume_step(self, checkpoint: Any) -> int | None:
        r = self._ckptstore_resume
        if r is not None and checkpoint is not None and os.fspath(checkpoint) == r[0]:
            return r[1]
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        step = self._resume_step(resume_from_checkpoint)
        if step is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc,no-any-return]
        hf: Any = self
        target = hf.model if model is None else model
        self.checkpoint_manager.restore({"model": hf.accelerator.unwrap_model(target)}, step=step)
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        step = self._resume_step(checkpoint)
        if step is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc,no-any-return]
        hf: Any = self
        top = set(self.checkpoint_manager.info(step).metadata.get("parts") or [])
        if "optimizer" not in top:
            log.warning("step %d was saved with save_only_model: optimizer, scheduler and RNG not restored", step)
            return None
        target: dict[str, Any] = {"optimizer": hf.optimizer, "scheduler": hf.lr_scheduler}
        scaler = getattr(hf.accelerator, "scaler", None)
        if scaler is not None and "scaler" in top:
            target["scaler"] = scaler
        self.checkpoint_manager.restore(target, step=step)
        if "rng" in top:
            rng = rng_holder()
            info = self.checkpoint_manager.restore({"rng": PerRank(rng)}, step=step, strict=False)
            if info.missing_per_rank:
                log.warning("step %d holds no RNG state of this rank (saved at another world size): not restored", step)
            else:
                self._ckptstore_rng = rng
        return None

    def _load_scaler(self, checkpoint: str | None) -> None:
        if self._resume_step(checkpoint) is None:
            return super()._load_scaler(checkpoint)  # type: ignore[misc,no-any-return]
        return None  # restored with the optimizer

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._resume_step(checkpoint) is None:
            return super()._load_rng_state(checkpoint)  # type: ignore[misc,no-any-return]
        if self._ckptstore_rng is not None:
            set_rng_state(self._ckptstore_rng)
        return None

    def _load_best_model(self) -> None:
        hf: Any = self
        best = hf.state.best_global_step
        mgr = self.checkpoint_manager
        if not best or best not in mgr.steps():
            return super()._load_best_model()  # type: ignore[misc,no-any-return]
        self._ckptstore_wait()
        log.info("loading the best model (step %d, score %s) from %s", best, hf.state.best_metric, mgr.url)
        model = hf.accelerator.unwrap_model(hf.model)
        mgr.restore({"model": model}, step=best)
        return None


def _norm_url(url: str) -> str:
    """A step's URL or local path in one spelling (``file://`` dropped, local paths absolute)."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://"))


def _finite_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = v
    return out


class CkptstoreTrainer(CkptstoreTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose checkpoints go through a :class:`CheckpointManager` (see the module doc).

    Example::

        trainer = CkptstoreTrainer(model=model, args=args, train_dataset=ds, checkpoint_root="s3://b/run")
        trainer.train(resume_from_checkpoint=True)
    """
