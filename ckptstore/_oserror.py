"""Typing raw ``OSError``s from a storage as :class:`~ckptstore.errors.StorageError` without losing their class.

Example::

    try:
        storage.remove(rel)
    except OSError as e:
        raise typed_os_error(e, "step 7 could not be deleted") from e   # still a PermissionError, say
"""

from __future__ import annotations

from .errors import CheckpointError, StorageError

_TYPED_OS_ERRORS: dict[type, type] = {}


def typed_os_error(e: BaseException, what: str) -> BaseException:
    """``e`` itself, or — for a raw ``OSError`` from the storage (ENOSPC, EIO, EFBIG, a reset connection...) — a
    :class:`StorageError` saying ``what`` happened, with the same ``errno``/``filename``, that is still an instance
    of ``e``'s built-in class (``except OSError`` / ``except PermissionError`` keep working)."""
    if not isinstance(e, OSError) or isinstance(e, CheckpointError):
        return e
    cls = StorageError
    if type(e) is not OSError:
        base = type(e)
        cls = _TYPED_OS_ERRORS.get(base)  # type: ignore[assignment]
        if cls is None:
            try:
                cls = type("StorageError", (StorageError, base), {"__module__": StorageError.__module__})
            except TypeError:  # an exotic OSError subclass that cannot be combined
                cls = StorageError
            _TYPED_OS_ERRORS[base] = cls
    err = cls(f"{what}: {type(e).__name__}: {e}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, e.filename
    return err


def reraise_typed(e: BaseException, what: str) -> None:
    """Raise ``typed_os_error(e, what)`` chained to ``e`` (or ``e`` itself when it is typed already)."""
    typed = typed_os_error(e, what)
    if typed is e:
        raise e
    raise typed from e
