"""Format layer: shard headers, manifest and state tree. Pure: no I/O and no collectives."""

from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, Piece, TensorEntry, parse_step_dir, step_dir
from .state import PerRank, flatten, unflatten

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "PerRank",
    "Piece",
    "TensorEntry",
    "flatten",
    "parse_step_dir",
    "step_dir",
    "unflatten",
]
