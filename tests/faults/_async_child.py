"""Child for async-save exit tests: commits step 1, starts an async save of step 2, then leaves.

    python _async_child.py ROOT MODE    # MODE: sigkill | os_exit | normal_exit
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from ckptstore import CheckpointManager
from ckptstore.storage import local as local_mod


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    mgr = CheckpointManager(root)
    mgr.save(1, {"w": torch.ones(1 << 20)})
    orig_write = local_mod._LocalWriter.write

    def slow_write(self, buffers):  # type: ignore[no-untyped-def]
        # Make the background write take long enough that the process leaves mid-way.
        import time

        time.sleep(0.5)
        orig_write(self, buffers)

    local_mod._LocalWriter.write = slow_write  # type: ignore[method-assign]
    mgr.save(2, {"w": torch.full((1 << 20,), 2.0)}, blocking=False)
    print("PENDING", flush=True)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "os_exit":
        os._exit(0)  # no interpreter shutdown: background thread dies with the process
    # normal_exit: fall off the end without wait(); the interpreter joins the writer thread first


if __name__ == "__main__":
    main()
