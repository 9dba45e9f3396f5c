"""Storage layer (bottom of the stack): byte I/O on one root over fsspec or the OS."""

from .base import FileWriter, Storage, open_storage

__all__ = ["FileWriter", "Storage", "open_storage"]
