"""Child for async-save exit tests: commits step 1, starts an async save of step 2, then leaves.

    python _async_child.py ROOT MODE [STORAGE_OPTIONS_JSON]    # MODE: sigkill | os_exit | normal_exit

With ``CKPT_TEST_OVERLAP=1`` the manager uses ``overlap_staging=True``: the process may then leave while the
staging copy itself still runs.

ROOT is any URL (a local path, s3://...). Every write of the background save is slowed down (a ``delay`` fault
of :class:`tests.fixtures.faulty.FaultyStorage`), so the process leaves while the save is in flight.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from ckptstore import CheckpointManager
from tests.fixtures.faulty import Fault, inject


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    overlap = os.environ.get("CKPT_TEST_OVERLAP") == "1"
    mgr = CheckpointManager(root, storage_options=opts, overlap_staging=overlap)
    mgr.save(1, {"w": torch.ones(1 << 20)})
    # Make the background write take long enough that the process leaves mid-way.
    inject(mgr, Fault("delay", op="write", seconds=0.5, times=None))
    mgr.save(2, {"w": torch.full((1 << 20,), 2.0)}, blocking=False)
    print("PENDING", flush=True)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "os_exit":
        os._exit(0)  # no interpreter shutdown: background thread dies with the process
    # normal_exit: fall off the end without wait(); the interpreter joins the writer thread first


if __name__ == "__main__":
    main()
