"""CkptstoreTrainer with a real transformers Trainer (CPU, GPT-2 of 2 layers built from a config, no hub): saves
go to a CheckpointManager (local disk and moto S3), ``train(resume_from_checkpoint=True)`` resumes mid-epoch and
ends bit-exactly where an uninterrupted plain ``Trainer`` run ends (weights, optimizer, scheduler, RNG-driven
dropout and data order)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError
from ckptstore.integrations.transformers import CkptstoreTrainer

pytestmark = [pytest.mark.integrations, pytest.mark.timeout(180)]

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

STEPS = 8


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 24, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.2, embd_pdrop=0.2)
    return GPT2LMHeadModel(cfg)


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,  # 6 steps per epoch: the resume at step 4 is mid-epoch
        "learning_rate": 5e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "weight_decay": 0.01,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 4,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    base.update(kw)
    return TrainingArguments(**base)


class StopAt(TrainerCallback):
    """Simulates a preemption: training stops right after the save at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain transformers Trainer, uninterrupted, no checkpoints: the run a resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    trainer = Trainer(model=_model(1), args=_args(out, save_strategy="no"), train_dataset=Tokens())
    trainer.train()
    return {
        "params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optim": trainer.optimizer.state_dict(),
        "sched": trainer.lr_scheduler.state_dict(),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }


def _check_resumed(trainer: Trainer, reference: dict[str, Any]) -> None:
    assert trainer.state.global_step == STEPS
    assert _same(trainer.model.state_dict(), reference["params"])
    assert _same(trainer.optimizer.state_dict(), reference["optim"])
    assert _same(trainer.lr_scheduler.state_dict(), reference["sched"])
    # The loss log continues the interrupted run's: steps 1-4 from the checkpoint's state, 5-8 from this run.
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == reference["losses"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_from_checkpoint_is_bit_exact(
    tmp_path: Path, reference: dict[str, Any], where: str, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        url, opts = request.getfixturevalue("s3_root")
        kw: dict[str, Any] = {"checkpoint_root": url, "storage_options": opts}
    else:
        kw = {}
    out = tmp_path / "out"
    first = CkptstoreTrainer(
        model=_model(1), args=_args(out), train_dataset=Tokens(), callbacks=[StopAt(4)], blocking=(where == "s3"), **kw
    )
    first.train()
    mgr = first.checkpoint_manager
    assert mgr.steps() == [4]
    info = mgr.info(4)
    assert info.metadata["framework"] == "transformers" and info.metadata["hf_trainer_state"]["global_step"] == 4
    assert set(info.metadata["parts"]) == {"model", "optimizer", "scheduler", "rng"}
    # Nothing went through the Trainer's own checkpoint-N/ files.
    assert not [p for p in (os.listdir(out) if out.exists() else []) if p.startswith("checkpoint-")]
    if where == "local":
        assert mgr.url.endswith(os.path.join("out", "ckptstore"))

    # A new process would build everything again: other initial weights, a new Trainer.
    # Local: the step named by its path (info().url is the file:// spelling of it); S3: True, the newest step.
    second = CkptstoreTrainer(model=_model(2), args=_args(out), train_dataset=Tokens(), **kw)
    if where == "local":
        assert info.url.startswith("file://")
        resume: Any = str(out / "ckptstore" / "step-000000000004")
    else:
        resume = True
    second.train(resume_from_checkpoint=resume)
    _check_resumed(second, reference)
    assert second.checkpoint_manager.steps() == [4, 8]


def test_resume_by_step_number_rotation_and_errors(tmp_path: Path, reference: dict[str, Any]) -> None:
    out = tmp_path / "out"
    root = tmp_path / "store"
    args = _args(out, save_steps=2, save_total_limit=2)
    first = CkptstoreTrainer(
        model=_model(1), args=args, train_dataset=Tokens(), checkpoint_root=root, callbacks=[StopAt(6)]
    )
    first.train()
    assert first.checkpoint_manager.steps() == [4, 6]  # save_total_limit=2 removed step 2
    # Resume from step 4 (by number), not the newest one: still the reference run.
    second = CkptstoreTrainer(model=_model(2), args=args, train_dataset=Tokens(), checkpoint_root=root)
    second.train(resume_from_checkpoint=4)
    _check_resumed(second, reference)
    # That resumed run saved 6 again (ckptstore's lineage supersedes the first run's step 6) and 8.
    mgr = CheckpointManager(root)
    assert mgr.steps() == [6, 8] and mgr.info(6).generation == 2

    # Training from scratch into a root that holds an earlier run's steps stops at the first save, with the way out.
    again = CkptstoreTrainer(model=_model(1), args=args, train_dataset=Tokens(), checkpoint_manager=mgr)
    with pytest.raises(CheckpointExistsError, match="resume_from_checkpoint=True"):
        again.train()
    assert mgr.steps() == [6, 8]

    empty = CkptstoreTrainer(
        model=_model(1), args=_args(tmp_path / "o2"), train_dataset=Tokens(), checkpoint_root=tmp_path / "none"
    )
    with pytest.raises(CheckpointNotFoundError, match="no committed step"):
        empty.train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointNotFoundError, match="committed steps"):
        empty.train(resume_from_checkpoint=12)
    with pytest.raises(CheckpointNotFoundError, match="neither a Hugging Face checkpoint"):
        empty.train(resume_from_checkpoint=str(tmp_path / "nowhere"))


def test_load_best_model_at_end_restores_the_best_step(tmp_path: Path) -> None:
    args = _args(
        tmp_path / "out",
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss is "best": an early step, not the last one
        save_total_limit=1,
    )
    trainer = CkptstoreTrainer(model=_model(1), args=args, train_dataset=Tokens(), eval_dataset=Tokens(8))
    trainer.train()
    mgr = trainer.checkpoint_manager
    best = trainer.state.best_global_step
    assert best != STEPS and mgr.steps() == [best, STEPS]  # save_total_limit=1 keeps the best and the newest
    assert trainer.state.best_model_checkpoint == mgr.info(best).url
    assert _same(trainer.model.state_dict(), mgr.load(best)["model"])
    assert not _same(trainer.model.state_dict(), mgr.load(STEPS)["model"])
