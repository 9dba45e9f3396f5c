"""Lightning (``lightning.pytorch``) adapter: checkpoints written by ckptstore instead of ``torch.save``.

``CkptstoreCheckpointIO`` is a Lightning ``CheckpointIO``: everything Lightning saves through its strategy
(``ModelCheckpoint``, ``trainer.save_checkpoint``, ``OnExceptionCheckpoint``) goes into ckptstore, and everything
it loads (``trainer.fit(ckpt_path=...)``, ``"last"``, ``"best"``, ``validate``/``test``) comes back from it.

**How a path maps to ckptstore.** Each checkpoint path Lightning asks for (``.../epoch=1-step=8.ckpt``,
``.../last.ckpt``) is a ckptstore *root*: a directory (or an S3 prefix) holding that checkpoint's steps. A save
commits a new step in it, numbered by the trainer's ``global_step`` (or the newest step + 1 when that number is
already taken, e.g. ``last.ckpt`` saved twice at one global step), then removes the older steps of that root
(retention ``keep_last: 1``): so ``last.ckpt`` is replaced atomically, never piles up, and a crash mid-save
leaves the previous ``last.ckpt`` loadable. ``remove_checkpoint`` (top-k removal) deletes the root's steps
(manifests first) and then the directory, as ``TorchCheckpointIO`` removes its file. ``ckptstore ls
dirpath/last.ckpt`` lists it; the Lightning path and global step are in each step's metadata.

Paths that are regular files (checkpoints written by ``torch.save`` before switching) are still loaded, with
Lightning's own ``TorchCheckpointIO``; new checkpoints are always ckptstore roots.

Saves run in the calling process only (Lightning calls ``save_checkpoint`` on global rank 0 with the full state;
the managers are built with ``distributed=False``). Strategies that write sharded checkpoints themselves
(FSDP/DeepSpeed sharded state) do not go through a ``CheckpointIO``.

Example::

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from ckptstore.integrations.lightning import CkptstoreCheckpointIO, load_from_checkpoint

    ckpt = ModelCheckpoint(dirpath="ckpts", monitor="val_loss", save_top_k=2, save_last=True)
    trainer = pl.Trainer(max_epochs=10, callbacks=[ckpt], plugins=[CkptstoreCheckpointIO(async_save=True)])
    trainer.fit(model, ckpt_path="last")                       # resumes from ckpts/last.ckpt if it exists
    best = load_from_checkpoint(MyModule, ckpt.best_model_path)  # LightningModule.load_from_checkpoint's twin
"""

from __future__ import annotations

import io as _io
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from .. import CheckpointManager, IOOptions, PendingSave
from ..errors import CheckpointNotFoundError, ConfigError

log = logging.getLogger("ckptstore")

__all__ = ["CkptstoreCheckpointIO", "CkptstoreModuleMixin", "is_ckptstore_checkpoint", "load_from_checkpoint"]

_T = TypeVar("_T")


def _key(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if "://" in p and not p.startswith("file://"):
        return p.rstrip("/")
    return os.path.abspath(p.removeprefix("file://"))


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _is_regular_file(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    """A checkpoint written by ``torch.save`` (a file), as opposed to a ckptstore root (a directory/prefix)."""
    if _is_local(path):
        return os.path.isfile(path.removeprefix("file://"))
    import fsspec

    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    try:
        return bool(fs.isfile(p))
    except OSError:
        return False


def is_ckptstore_checkpoint(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``path`` holds at least one committed ckptstore step (a checkpoint this module wrote).

    Example::

        is_ckptstore_checkpoint("ckpts/last.ckpt")     # True after a save through CkptstoreCheckpointIO
    """
    p = os.fspath(path)
    if _is_regular_file(p, storage_options):
        return False
    if _is_local(p) and not os.path.isdir(p.removeprefix("file://")):
        return False
    with CheckpointManager(p, storage_options=dict(storage_options or {}), distributed=False) as mgr:
        return bool(mgr.steps())


class CkptstoreCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores each checkpoint path as a ckptstore root (see the module doc).

    ``async_save=True`` uses ckptstore's own asynchronous save: the state is copied into staging memory when
    Lightning calls ``save_checkpoint`` and written, committed and the previous step removed in the background;
    at most ``max_pending`` saves (of different paths) are in flight, a new one first waits for the oldest. A failed
    background save re-raises (its own type) at the next save, load, remove or ``teardown()``. Lightning's
    ``AsyncCheckpointIO(CkptstoreCheckpointIO())`` works as well (Lightning's thread calls this synchronous IO).

    ``storage_options`` go to fsspec/s3fs for ``s3://`` paths; ``io`` is an :class:`ckptstore.IOOptions` (or
    dict); ``allow_pickle=True`` lets hyper-parameters that are not JSON values (a ``Path``, a custom object) be
    pickled, and such checkpoints then load only with ``trusted=True``. ``map_location`` is the default for
    loads whose caller passes none (``None``: the saved devices).

    Example::

        trainer = pl.Trainer(plugins=[CkptstoreCheckpointIO()], callbacks=[ModelCheckpoint(dirpath="ckpts")])
        trainer.fit(model, ckpt_path="last")
    """

    def __init__(
        self,
        *,
        storage_options: Mapping[str, Any] | None = None,
        io: IOOptions | Mapping[str, Any] | None = None,
        async_save: bool = False,
        max_pending: int = 2,
        allow_pickle: bool = False,
        trusted: bool = False,
        map_location: Any = None,
    ) -> None:
        if not isinstance(async_save, bool):
            raise ConfigError(f"async_save must be True or False, got {async_save!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.storage_options = dict(storage_options or {})
        self.io = io if isinstance(io, IOOptions) else IOOptions.from_dict(dict(io) if io is not None else None)
        self.async_save = async_save
        self.max_pending = max_pending
        self.allow_pickle = allow_pickle
        self.trusted = trusted
        self.map_location = map_location
        self._lock = threading.Lock()
        # path key -> (manager, its in-flight save); only async saves keep a manager open between calls.
        self._pending: dict[str, tuple[CheckpointManager, PendingSave]] = {}

    # -- helpers ------------------------------------------------------------------------------------------
    def _manager(self, path: str) -> CheckpointManager:
        return CheckpointManager(
            path,
            storage_options=self.storage_options,
            io=self.io,
            retention={"keep_last": 1},
            allow_pickle=self.allow_pickle,
            distributed=False,
        )

    def _finish(self, key: str | None = None) -> None:
        """Wait for the in-flight save of ``key`` (or of every path), close its manager, re-raise its error."""
        with self._lock:
            keys = [key] if key is not None else list(self._pending)
            items = [(k, self._pending.pop(k)) for k in keys if k in self._pending]
        first: BaseException | None = None
        for _, (mgr, pending) in items:
            try:
                pending.wait()
            except BaseException as e:  # re-raised below, after every manager is closed
                first = first or e
            finally:
                try:
                    mgr.close()
                except BaseException as e:
                    first = first or e
        if first is not None:
            raise first

    def _reap(self) -> None:
        """Close managers whose background save is done (re-raising a failure); keep at most max_pending - 1."""
        with self._lock:
            done = [k for k, (_, p) in self._pending.items() if p.done()]
            oldest = [k for k in self._pending if k not in done]
        for k in done:
            self._finish(k)
        while len(oldest) >= self.max_pending:
            self._finish(oldest.pop(0))

    # -- CheckpointIO -------------------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Commit ``checkpoint`` as a new step of the root ``path`` and drop that root's older steps.

        Example::

            trainer.save_checkpoint("ckpts/manual.ckpt")    # Lightning calls this on global rank 0
        """
        if storage_options is not None:
            raise ConfigError(
                f"CkptstoreCheckpointIO.save_checkpoint got storage_options={storage_options!r}; pass them to "
                "CkptstoreCheckpointIO(storage_options=...) instead"
            )
        p = os.fspath(path)
        key = _key(p)
        if _is_regular_file(p, self.storage_options):
            raise ConfigError(
                f"{p} is a regular file (a torch.save checkpoint?); ckptstore stores each checkpoint path as a "
                "directory: remove the file or save to another path"
            )
        self._finish(key)  # this path's previous save first: its step number decides this one's
        self._reap()
        mgr = self._manager(p)
        try:
            existing = mgr.steps()
            global_step = checkpoint.get("global_step")
            newest = existing[-1] if existing else -1
            if isinstance(global_step, int) and not isinstance(global_step, bool) and global_step > newest:
                step = global_step
            else:
                step = newest + 1
            epoch = checkpoint.get("epoch")
            metadata = {
                "framework": "lightning",
                "lightning_path": p,
                "global_step": global_step if isinstance(global_step, int) else None,
                "lightning_version": str(checkpoint.get("pytorch-lightning_version", "")),
            }
            result = mgr.save(
                step,
                checkpoint,
                epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
                metadata=metadata,
                blocking=not self.async_save,
            )
        except BaseException:
            mgr.close()
            raise
        if isinstance(result, PendingSave):
            with self._lock:
                self._pending[key] = (mgr, result)
        else:
            mgr.close()

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path`` (its newest committed, verified step).

        ``weights_only`` is accepted for Lightning's signature: ckptstore never unpickles unless the checkpoint
        was saved with ``allow_pickle`` and this IO has ``trusted=True``. A regular file is loaded with
        Lightning's ``TorchCheckpointIO``. A missing path raises ``CheckpointNotFoundError``
        (a ``FileNotFoundError``).

        Example::

            ckpt = CkptstoreCheckpointIO().load_checkpoint("ckpts/last.ckpt", map_location="cpu")
            ckpt["global_step"], ckpt["state_dict"].keys()
        """
        p = os.fspath(path)
        self._finish(_key(p))
        if map_location is None:
            map_location = self.map_location
        if _is_regular_file(p, self.storage_options):
            from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

            return TorchCheckpointIO().load_checkpoint(p, map_location=map_location, weights_only=weights_only)
        if _is_local(p) and not os.path.isdir(p.removeprefix("file://")):
            raise CheckpointNotFoundError(f"checkpoint {p} does not exist (no such file or ckptstore directory)")
        with self._manager(p) as mgr:
            if not mgr.steps():
                raise CheckpointNotFoundError(
                    f"{p} holds no committed ckptstore step (an interrupted first save, or not a checkpoint)"
                )
            state = mgr.load("latest", map_location=map_location, trusted=self.trusted)
        if not isinstance(state, dict):
            raise ConfigError(f"{p} does not hold a Lightning checkpoint dict (found {type(state).__name__})")
        return state

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint at ``path``: every step (manifests first), then the directory itself.

        A symbolic link (``ModelCheckpoint(save_last="link")``) is unlinked, never followed.

        Example::

            CkptstoreCheckpointIO().remove_checkpoint("ckpts/epoch=0-step=8.ckpt")
        """
        p = os.fspath(path)
        self._finish(_key(p))
        local = p.removeprefix("file://") if _is_local(p) else None
        if local is not None and os.path.islink(local):
            os.unlink(local)
            return
        if local is not None and not os.path.lexists(local):
            return
        if not _is_regular_file(p, self.storage_options):
            with self._manager(p) as mgr:
                for s in mgr.steps():
                    mgr.delete(s)
        import fsspec

        fs, fp = fsspec.core.url_to_fs(p, **self.storage_options)
        if fs.exists(fp):
            fs.rm(fp, recursive=True)

    def teardown(self) -> None:
        """Wait for every background save (re-raising the first failure) and close their managers."""
        self._finish()


def load_from_checkpoint(
    cls: type[_T],
    checkpoint_path: str | os.PathLike[str],
    map_location: Any = None,
    hparams_file: str | os.PathLike[str] | None = None,
    strict: bool | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    trusted: bool = False,
    **kwargs: Any,
) -> _T:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a checkpoint written by ``CkptstoreCheckpointIO``.

    Lightning's own ``LightningModule.load_from_checkpoint`` opens the path as one file and fails on a ckptstore
    directory (``IsADirectoryError``): it does not go through the trainer's ``CheckpointIO``. This function
    loads the checkpoint dict with ckptstore and builds the module exactly as Lightning does (hyper-parameters
    from the checkpoint, overridden by ``kwargs``; ``on_load_checkpoint``; ``load_state_dict`` with ``strict``;
    moved to the device of the loaded weights). Works for ``LightningDataModule`` classes too. A regular file is
    passed to ``cls.load_from_checkpoint`` unchanged. ``map_location`` defaults to ``"cpu"`` (not the saved
    device: a checkpoint saved on a GPU loads on a machine without one).

    Example::

        model = load_from_checkpoint(MyModule, "ckpts/epoch=3-step=400.ckpt", lr=1e-4)
    """
    p = os.fspath(checkpoint_path)
    if _is_regular_file(p, storage_options):
        return cls.load_from_checkpoint(  # type: ignore[attr-defined,no-any-return]
            p, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs
        )
    checkpoint = CkptstoreCheckpointIO(storage_options=storage_options, trusted=trusted).load_checkpoint(
        p, map_location="cpu" if map_location is None else map_location
    )
    return _build_from_checkpoint(cls, checkpoint, p, hparams_file, strict, **kwargs)


def _build_from_checkpoint(
    cls: type[_T],
    checkpoint: dict[str, Any],
    path: str,
    hparams_file: str | os.PathLike[str] | None,
    strict: bool | None,
    **kwargs: Any,
) -> _T:
    import lightning.pytorch as pl

    try:
        from lightning.pytorch.core.saving import _load_state
    except ImportError:  # a Lightning without the private helper: go through the public API with a buffer
        import torch

        buf = _io.BytesIO()
        torch.save(checkpoint, buf)
        buf.seek(0)
        return cls.load_from_checkpoint(  # type: ignore[attr-defined,no-any-return]
            buf, map_location="cpu", hparams_file=hparams_file, strict=strict, weights_only=False, **kwargs
        )
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

    checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=path)
    hp_key = cls.CHECKPOINT_HYPER_PARAMS_KEY  # type: ignore[attr-defined]
    if hparams_file is not None:
        from lightning.pytorch.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml

        ext = Path(hparams_file).suffix.lower()
        if ext == ".csv":
            checkpoint[hp_key] = load_hparams_from_tags_csv(hparams_file)
        elif ext in (".yml", ".yaml"):
            checkpoint[hp_key] = load_hparams_from_yaml(hparams_file)
        else:
            raise ConfigError(f"hparams_file must be a .csv, .yml or .yaml file, got {hparams_file!r}")
    checkpoint.setdefault(hp_key, {})
    checkpoint[hp_key].update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)  # type: ignore[return-value]
    if not issubclass(cls, pl.LightningModule):
        raise ConfigError(f"{cls.__name__} is neither a LightningModule nor a LightningDataModule subclass")
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    import torch

    state_dict = checkpoint.get("state_dict") or {}
    tensor = next((t for t in state_dict.values() if isinstance(t, torch.Tensor)), None)
    if tensor is None:
        log.warning("the state dict in %s contains no parameters", path)
        return model  # type: ignore[return-value]
    return model.to(tensor.device)  # type: ignore[return-value]


class CkptstoreModuleMixin:
    """Mix into a ``LightningModule`` (before it) so ``MyModule.load_from_checkpoint(path)`` reads ckptstore
    checkpoints too (and regular files as before).

    Example::

        class MyModule(CkptstoreModuleMixin, pl.LightningModule): ...
        model = MyModule.load_from_checkpoint("ckpts/last.ckpt")
    """

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(checkpoint_path, (str, os.PathLike)) and not _is_regular_file(
            os.fspath(checkpoint_path), kwargs.get("storage_options")
        ):
            return load_from_checkpoint(cls, checkpoint_path, map_location, hparams_file, strict, **kwargs)
        return super().load_from_checkpoint(  # type: ignore[misc]
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs
        )
