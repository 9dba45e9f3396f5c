"""ckptstore: distributed-aware, pickle-free checkpoints for PyTorch on local disk, memory:// and S3.

Example::

    from ckptstore import CheckpointManager

    with CheckpointManager("./checkpoints", retention={"keep_last": 3}) as mgr:
        mgr.save(100, {"model": model, "optim": optimizer}, epoch=2, metrics={"loss": 0.41})
        info = mgr.restore({"model": model, "optim": optimizer})
"""

from . import errors
from ._version import __version__
from .elastic import ElasticSampler
from .errors import CheckpointError
from .format.state import PerRank, Pickled
from .manager import CheckpointManager, PendingSave
from .options import IOOptions
from .types import CheckpointInfo, SaveResult

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "ElasticSampler",
    "IOOptions",
    "PendingSave",
    "PerRank",
    "Pickled",
    "SaveResult",
    "__version__",
    "errors",
]
