"""CkptstoreCheckpointIO with a real Lightning Trainer (CPU, tiny model): ModelCheckpoint paths, top-k removal,
``fit(ckpt_path="last")`` bit-exact against an uninterrupted run, ``load_from_checkpoint``, async saves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from ckptstore import CheckpointManager
from ckptstore.errors import (
    CheckpointNotFoundError,
    ConfigError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from ckptstore.integrations.lightning import (
    CkptstoreCheckpointIO,
    CkptstoreModuleMixin,
    is_ckptstore_checkpoint,
    load_from_checkpoint,
)

pytestmark = [pytest.mark.integrations, pytest.mark.timeout(120)]

warnings.filterwarnings("ignore", module="lightning")


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Linear(width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


class MixedNet(CkptstoreModuleMixin, Net):
    pass


def _data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(48, 1, generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=16)


def _trainer(epochs: int, callbacks: list[Any], plugins: list[Any] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        plugins=plugins,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, *_: Any) -> None:
        self.n += 1


def _fit(
    epochs: int,
    callbacks: list[Any],
    plugins: list[Any] | None = None,
    ckpt_path: str | None = None,
    seed: int = 1,
) -> Net:
    torch.manual_seed(seed)
    model = Net()
    train, val = _data()
    _trainer(epochs, callbacks, plugins).fit(model, train, val, ckpt_path=ckpt_path)
    return model


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    """4 epochs in one go, saving through ckptstore: the final weights, optimizer and scheduler state."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ckpt = ModelCheckpoint(dirpath=d, save_last=True)
        model = _fit(4, [ckpt], [CkptstoreCheckpointIO()])
        trainer = model.trainer
        return {
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "optim": trainer.optimizers[0].state_dict(),
            "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        }


def _plugin(mode: str) -> Any:
    if mode == "sync":
        return CkptstoreCheckpointIO()
    if mode == "ckptstore-async":
        return CkptstoreCheckpointIO(async_save=True)
    return AsyncCheckpointIO(CkptstoreCheckpointIO())


def _step_of(name: str) -> int:
    m = re.fullmatch(r"epoch=\d+-step=(\d+)\.ckpt", name)
    return int(m.group(1)) if m else 12


@pytest.mark.parametrize("mode", ["sync", "ckptstore-async", "lightning-async"])
def test_resume_from_last_is_bit_exact_and_top_k_keeps_k_roots(
    tmp_path: Path, uninterrupted: dict[str, Any], mode: str
) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    _fit(2, [ckpt], [_plugin(mode)])
    # Every checkpoint path is a ckptstore root with exactly one step, numbered by the global step.
    names = sorted(os.listdir(tmp_path))
    assert "last.ckpt" in names and len(names) == 3, names
    for n in names:
        with CheckpointManager(tmp_path / n, distributed=False) as mgr:
            assert len(mgr.steps()) == 1, (n, mgr.steps())
            info = mgr.latest()
            assert info is not None and info.metadata["framework"] == "lightning"
            assert info.step == info.metadata["global_step"] == _step_of(n)
    assert is_ckptstore_checkpoint(tmp_path / "last.ckpt")

    # A fresh trainer (other initial weights) resumes from "last" and trains epochs 3 and 4 only: bit-exact with the
    # uninterrupted run.
    ckpt2 = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    count = CountBatches()
    model = _fit(4, [ckpt2, count], [_plugin(mode)], ckpt_path="last", seed=2)
    trainer = model.trainer
    assert trainer.global_step == 24 and count.n == 12
    assert _same(model.state_dict(), uninterrupted["params"])
    assert _same(trainer.optimizers[0].state_dict(), uninterrupted["optim"])
    assert _same(trainer.lr_scheduler_configs[0].scheduler.state_dict(), uninterrupted["sched"])

    # last.ckpt did not pile up steps, top-k still holds 2 roots, each removed path is gone entirely.
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 3 and "last.ckpt" in names, names
    with CheckpointManager(tmp_path / "last.ckpt", distributed=False) as mgr:
        assert mgr.steps() == [24]
    best = {os.path.basename(p) for p in ckpt2.best_k_models}
    assert best == set(names) - {"last.ckpt"}
    for n in best:
        with CheckpointManager(tmp_path / n, distributed=False) as mgr:
            assert len(mgr.steps()) == 1


def test_last_saved_twice_at_one_global_step_keeps_one_step(tmp_path: Path) -> None:
    model = _fit(1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)], [CkptstoreCheckpointIO()])
    trainer = model.trainer
    path = tmp_path / "manual.ckpt"
    for _ in range(3):  # the same global step three times: a new step number each time, one kept
        trainer.save_checkpoint(path)
    with CheckpointManager(path, distributed=False) as mgr:
        assert mgr.steps() == [8]  # 6, 7, 8: global step 6 was taken
        assert mgr.latest().metadata["global_step"] == 6
    loaded = CkptstoreCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 6 and _same(loaded["state_dict"], model.state_dict())


def test_load_from_checkpoint_helper_and_mixin(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    torch.manual_seed(1)
    model = Net(lr=0.01, width=8)
    train, val = _data()
    _trainer(2, [ckpt], [CkptstoreCheckpointIO()]).fit(model, train, val)
    path = ckpt.best_model_path
    assert os.path.isdir(path)
    # Lightning's own loader opens the path as one file.
    with pytest.raises(IsADirectoryError):
        Net.load_from_checkpoint(path)
    loaded = load_from_checkpoint(Net, path)
    assert isinstance(loaded, Net) and loaded.hparams.width == 8 and loaded.hparams.lr == 0.01
    assert _same(loaded.state_dict(), model.state_dict())
    # Keyword arguments override saved hyper-parameters, as in Lightning.
    assert load_from_checkpoint(Net, path, lr=0.5).hparams.lr == 0.5
    mixed = MixedNet.load_from_checkpoint(path)
    assert isinstance(mixed, MixedNet) and _same(mixed.state_dict(), model.state_dict())
    # trainer.validate(ckpt_path=...) goes through the CheckpointIO as well.
    res = _trainer(1, [], [CkptstoreCheckpointIO()]).validate(Net(lr=0.01, width=8), val, ckpt_path=path)
    assert res and "val_loss" in res[0]


def test_torch_save_checkpoint_files_still_load(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = _fit(1, [ckpt])  # Lightning's default TorchCheckpointIO: regular files
    path = tmp_path / "last.ckpt"
    assert path.is_file() and not is_ckptstore_checkpoint(path)
    loaded = CkptstoreCheckpointIO().load_checkpoint(path, weights_only=False)
    assert _same(loaded["state_dict"], model.state_dict())
    assert _same(load_from_checkpoint(Net, path, weights_only=False).state_dict(), model.state_dict())
    # Saving to it with ckptstore is refused (it would have to become a directory), with the reason.
    with pytest.raises(ConfigError, match="regular file"):
        CkptstoreCheckpointIO().save_checkpoint(loaded, path)


def test_missing_and_empty_paths_raise_not_found(tmp_path: Path) -> None:
    io = CkptstoreCheckpointIO()
    with pytest.raises(CheckpointNotFoundError):
        io.load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="no committed ckptstore step"):
        io.load_checkpoint(tmp_path / "empty.ckpt")
    io.remove_checkpoint(tmp_path / "nope.ckpt")  # like TorchCheckpointIO: nothing there, nothing to do
    io.remove_checkpoint(tmp_path / "empty.ckpt")
    assert not (tmp_path / "empty.ckpt").exists()
    with pytest.raises(ConfigError, match="storage_options"):
        io.save_checkpoint({"global_step": 1}, tmp_path / "x.ckpt", storage_options={"a": 1})


class Opaque:
    """Not a JSON value: a checkpoint holding it needs allow_pickle."""


def test_unpicklable_hparams_refused_unless_allowed(tmp_path: Path) -> None:
    ck = {"global_step": 3, "epoch": 0, "state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"obj": Opaque()}}
    with pytest.raises(UnsupportedValueError):
        CkptstoreCheckpointIO().save_checkpoint(ck, tmp_path / "a.ckpt")
    assert not is_ckptstore_checkpoint(tmp_path / "a.ckpt")
    CkptstoreCheckpointIO(allow_pickle=True).save_checkpoint(ck, tmp_path / "b.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        CkptstoreCheckpointIO().load_checkpoint(tmp_path / "b.ckpt")
    back = CkptstoreCheckpointIO(trusted=True).load_checkpoint(tmp_path / "b.ckpt")
    assert isinstance(back["hyper_parameters"]["obj"], Opaque) and torch.equal(back["state_dict"]["w"], torch.ones(2))


def test_save_last_link_and_async_failure_reraised(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=1, save_last="link")
    model = _fit(2, [ckpt], [CkptstoreCheckpointIO()])
    link = tmp_path / "last.ckpt"
    assert link.is_symlink() and is_ckptstore_checkpoint(link)
    assert _same(CkptstoreCheckpointIO().load_checkpoint(link)["state_dict"], model.state_dict())
    target = link.resolve()
    CkptstoreCheckpointIO().remove_checkpoint(link)  # unlinks, never deletes what the link points to
    assert not link.exists() and is_ckptstore_checkpoint(target)

    # A background save that fails re-raises its own error at teardown: here the step's directory is taken by a
    # regular file, which the background writer refuses to use.
    root = tmp_path / "x.ckpt"
    root.mkdir()
    (root / "step-000000000001").write_bytes(b"")
    io = CkptstoreCheckpointIO(async_save=True)
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, root)  # returns before the write
    with pytest.raises(StorageError, match="regular file"):
        io.teardown()
    io.teardown()  # reported once


@pytest.mark.timeout(60)
def test_importing_ckptstore_imports_no_framework() -> None:
    # A fresh interpreter: importing ckptstore and the integrations package must not pull in any framework.
    code = (
        "import sys, ckptstore, ckptstore.integrations\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'lightning_fabric', 'transformers', 'accelerate'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"


def test_s3_dirpath_resume_from_last_ckpt(
    s3_root: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, uninterrupted: dict[str, Any]
) -> None:
    url, opts = s3_root
    # Lightning lists dirpath with its own fsspec (no storage options): point botocore at the moto server.
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["client_kwargs"]["endpoint_url"])
    dirpath = f"{url}/ckpts"
    _fit(2, [ModelCheckpoint(dirpath=dirpath, save_last=True)], [CkptstoreCheckpointIO(storage_options=opts)])
    with CheckpointManager(f"{dirpath}/last.ckpt", storage_options=opts) as mgr:
        assert mgr.steps() == [12]
    count = CountBatches()
    ckpt = ModelCheckpoint(dirpath=dirpath, save_last=True)
    # An explicit path: Lightning's own ckpt_path="last" lookup drops the s3:// of the listed names (a Lightning
    # limitation with any CheckpointIO), so it finds nothing on S3.
    last = f"{dirpath}/last.ckpt"
    model = _fit(4, [ckpt, count], [CkptstoreCheckpointIO(storage_options=opts)], ckpt_path=last, seed=2)
    assert count.n == 12 and _same(model.state_dict(), uninterrupted["params"])
    with CheckpointManager(f"{dirpath}/last.ckpt", storage_options=opts) as mgr:
        assert mgr.steps() == [24]
    # save_top_k=1 (no monitor) kept one epoch=... root and removed the previous ones entirely.
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(dirpath.removeprefix("s3://"), refresh=True))
    assert names == ["epoch=3-step=24.ckpt", "last.ckpt"], names
