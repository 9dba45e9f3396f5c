"""Seed parity: the tutorial's model + SGD checkpoint restores into fresh objects and continues bit-exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tutorial.py"


def _load():
    spec = importlib.util.spec_from_file_location("ckpt_tutorial_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path: Path, capsys) -> None:
    tut = _load()
    assert tut.run(str(tmp_path / "ck"), epochs=3, resume_after=1, batches=3, verbose=True) is True
    out = capsys.readouterr().out
    assert "conv1.weight\ttorch.Size([6, 3, 5, 5])" in out
    assert "fc1.bias\ttorch.Size([120])" in out
    assert "'lr': 0.001" in out and "'momentum': 0.9" in out
    assert "bit for bit: model True, optimizer True" in out


def test_tutorial_checkpoint_dict_pattern(tmp_path: Path) -> None:
    """The tutorial's {'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'} dict, saved and loaded."""
    from ckptstore import CheckpointManager

    tut = _load()
    model, opt = tut.make_objects()
    tut.train_epoch(model, opt, 0, 2)
    loss = torch.tensor(0.25)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(
        5,
        {"epoch": 5, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": loss},
    )
    checkpoint = mgr.load(5)
    model2, opt2 = tut.make_objects()
    model2.load_state_dict(checkpoint["model_state_dict"])
    opt2.load_state_dict(checkpoint["optimizer_state_dict"])
    assert checkpoint["epoch"] == 5 and torch.equal(checkpoint["loss"], loss)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    model2.eval()
