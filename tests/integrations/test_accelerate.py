"""ckptstore.integrations.accelerate with a real accelerate Accelerator on CPU: save_state/load_state through a
CheckpointManager (local disk and moto S3) resume bit-exactly against an uninterrupted run — weights, optimizer,
scheduler, gradient-accumulation position, a registered object, shuffling and dropout RNG, seedable sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset

from ckptstore import CheckpointManager, PendingSave
from ckptstore.errors import StateMismatchError
from ckptstore.integrations.accelerate import load_state, save_state

pytestmark = [pytest.mark.integrations, pytest.mark.timeout(120)]

EPOCHS = 4


class Counter:
    """A registered object (``accelerator.register_for_checkpointing``) with a tensor and a plain counter."""

    def __init__(self) -> None:
        self.seen = 0
        self.ema = torch.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "ema": self.ema}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.seen = sd["seen"]
        self.ema.copy_(sd["ema"])


def _setup(seed: int, seedable: bool) -> tuple[Accelerator, Any, Any, Any, Any, Counter]:
    acc = Accelerator(
        cpu=True,
        gradient_accumulation_steps=3,  # 10 batches an epoch: the position carries over epochs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable, data_seed=7 if seedable else None),
    )
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    return acc, model, opt, loader, sched, counter


def _epoch(acc: Accelerator, model: Any, opt: Any, loader: Any, sched: Any, counter: Counter, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    for x, y in loader:
        with acc.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        counter.seen += len(x)
        counter.ema.mul_(0.9).add_(x.mean(0), alpha=0.1)


def _snapshot(acc: Accelerator, model: Any, opt: Any, sched: Any, counter: Counter) -> dict[str, Any]:
    return {
        "params": {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()},
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": acc.step,
        "seen": counter.seen,
        "ema": counter.ema.clone(),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.mark.parametrize(("where", "seedable"), [("local", False), ("local", True), ("s3", False)])
def test_save_and_load_state_resume_bit_exact(
    tmp_path: Path, where: str, seedable: bool, request: pytest.FixtureRequest
) -> None:
    torch.manual_seed(123)
    objs = _setup(1, seedable)
    for e in range(EPOCHS):
        _epoch(*objs, e)
    reference = _snapshot(*objs[:3], objs[4], objs[5])

    if where == "s3":
        url, opts = request.getfixturevalue("s3_root")
        mgr = CheckpointManager(url, storage_options=opts)
    else:
        mgr = CheckpointManager(tmp_path / "ckpt")
    torch.manual_seed(123)
    objs = _setup(1, seedable)
    for e in range(2):
        _epoch(*objs, e)
    res = save_state(objs[0], mgr, step=20, epoch=1, blocking=(where == "local"))
    if isinstance(res, PendingSave):
        res.wait()
    assert mgr.steps() == [20]
    assert set(mgr.info(20).metadata["parts"]) == {
        "models",
        "optimizers",
        "schedulers",
        "custom",
        "dataloaders",
        "rng",
        "accelerator",
    }

    # A new run: other initial weights, other global RNG (as a new process would have); load_state sets it all.
    torch.manual_seed(999)
    fresh = _setup(2, seedable)
    info = load_state(fresh[0], mgr)
    assert info.step == 20 and info.epoch == 1
    for e in range(2, EPOCHS):
        _epoch(*fresh, e)
    got = _snapshot(*fresh[:3], fresh[4], fresh[5])
    for key in reference:
        assert _same(got[key], reference[key]), key
    mgr.close()


def test_load_state_refuses_other_objects_before_changing_anything(tmp_path: Path) -> None:
    acc, model, opt, loader, sched, counter = _setup(1, False)
    _epoch(acc, model, opt, loader, sched, counter, 0)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        save_state(acc, mgr, step=5)
        other = Accelerator(cpu=True)
        torch.manual_seed(3)
        m2 = other.prepare(torch.nn.Linear(3, 4))  # another architecture
        before = {k: v.clone() for k, v in m2.state_dict().items()}
        with pytest.raises(StateMismatchError, match="prepared in the same order"):
            load_state(other, mgr)
        assert _same(m2.state_dict(), before)


def test_counters_and_seedable_sampler_position_come_back(tmp_path: Path) -> None:
    acc, _, _, loader, _, _ = _setup(1, True)
    loader.set_epoch(3)
    acc.step = 2  # mid-accumulation (a save between two micro-batches)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        save_state(acc, mgr, step=7)
        save_state(acc, mgr, step=8)
        assert acc.save_iteration == 2
        fresh = _setup(2, True)
        assert fresh[0].step == 0 and fresh[0].save_iteration == 0
        load_state(fresh[0], mgr, step=7)
        assert fresh[0].step == 2 and fresh[0].save_iteration == 1
        sampler = fresh[3].get_sampler()
        assert sampler.epoch == 3 and sampler.initial_seed == loader.get_sampler().initial_seed
