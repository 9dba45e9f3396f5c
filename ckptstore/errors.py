"""Typed errors raised by ckptstore.

Every error subclasses :class:`CheckpointError` *and* the built-in exception that fits it, so callers can catch
either ``ckptstore.errors.CheckpointNotFoundError`` or plain ``FileNotFoundError``.

Example::

    from ckptstore.errors import CheckpointError, IntegrityError
    try:
        mgr.restore(state, step=1200)
    except IntegrityError as e:
        print("corrupt:", e.step, e.file, e.key)
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error ckptstore raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested step (or the root, or a file of a step) does not exist."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step

    def __str__(self) -> str:  # FileNotFoundError would otherwise print "[Errno None]"
        return str(self.args[0]) if self.args else ""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed step with this number already exists; steps are immutable."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IntegrityError(CheckpointError, ValueError):
    """Stored bytes do not match the manifest (checksum, size or truncated read)."""

    def __init__(
        self, message: str, *, step: int | None = None, file: str | None = None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.file = file
        self.key = key


class ManifestError(CheckpointError, ValueError):
    """A manifest or shard header is missing fields, malformed, oversized or of an unknown version."""


class UnsafeCheckpointError(CheckpointError, PermissionError):
    """Refused for safety: pickled data without ``trusted=True``, or a path that escapes the step prefix."""


class DistributedSaveError(CheckpointError, OSError):
    """A distributed save failed on at least one rank; no manifest was written. ``failed_ranks`` names them."""

    def __init__(self, message: str, *, failed_ranks: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failed_ranks: dict[int, str] = dict(failed_ranks or {})

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(CheckpointError, ValueError):
    """A configuration value or option is invalid; the message names the field and what is expected."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A value in the state cannot be stored without pickle (pass ``allow_pickle=True`` to store it anyway)."""


class StateChangedError(CheckpointError, RuntimeError):
    """An async save with ``overlap_staging`` saw a tensor change in place before it was copied; the step was
    not saved. Call ``PendingSave.wait_staged()`` before such changes (see ``ckptstore.overlap``)."""


class StateMismatchError(CheckpointError, KeyError):
    """The target state does not match the checkpoint (missing/unexpected keys, shape or dtype mismatch)."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StorageError(CheckpointError, OSError):
    """The storage backend failed persistently (after retries) — e.g. repeated S3 5xx responses."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedStorageError(StorageError):
    """The storage lacks a guarantee ckptstore relies on, e.g. an S3-compatible server that ignores
    ``If-None-Match: *`` (two writers of one step would both "commit"). The message names the limitation and the
    opt-in (``IOOptions.s3_single_writer``) where one exists. ``errno`` is ``EOPNOTSUPP``."""


__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DistributedSaveError",
    "IntegrityError",
    "ManifestError",
    "StateChangedError",
    "StateMismatchError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedStorageError",
    "UnsupportedValueError",
]
