"""Child process for the SIGKILL tests: commits step 1, then dies at a chosen point of saving step 2.

    python _save_child.py ROOT POINT [SEED]

POINT is one of the hook names below ("open_write:N" = at the N-th shard file opened, "write:N" = in the N-th
vectored write, "commit:before_tmp" / "commit:before_link" / "commit:after_link"), or "random" to SIGKILL
itself after a seeded random delay while saving a larger state in a loop.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading

import torch

from ckptstore import CheckpointManager, IOOptions
from ckptstore.storage import local as local_mod


def state(step: int, n: int = 8, size: int = 64 * 1024) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {f"t{i}": torch.randn(size, generator=g) for i in range(n)}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    counter = {"n": 0}
    if kind == "open_write":
        orig_init = local_mod._LocalWriter.__init__

        def init(self, path: str) -> None:  # type: ignore[no-untyped-def]
            counter["n"] += 1
            if counter["n"] == int(arg):
                die()
            orig_init(self, path)

        local_mod._LocalWriter.__init__ = init  # type: ignore[method-assign]
    elif kind == "write":
        orig_write = local_mod._LocalWriter.write

        def write(self, buffers):  # type: ignore[no-untyped-def]
            counter["n"] += 1
            if counter["n"] == int(arg):
                # Half of this batch reaches the file, then the process dies: a torn shard.
                first = buffers[: max(1, len(buffers) // 2)]
                orig_write(self, first)
                die()
            orig_write(self, buffers)

        local_mod._LocalWriter.write = write  # type: ignore[method-assign]
    elif kind == "commit":
        orig_link = os.link
        orig_open = os.open

        def fake_open(path, flags, *a, **k):  # type: ignore[no-untyped-def]
            if arg == "before_tmp" and ".manifest.json.tmp-" in str(path):
                die()
            return orig_open(path, flags, *a, **k)

        def fake_link(src, dst, *a, **k):  # type: ignore[no-untyped-def]
            manifest = str(dst).endswith("manifest.json")  # not the save's lease, which is linked first
            if arg == "before_link" and manifest:
                die()
            orig_link(src, dst, *a, **k)
            if arg == "after_link" and manifest:
                die()

        os.open = fake_open  # type: ignore[assignment]
        os.link = fake_link  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown point {point}")


def main() -> None:
    root, point = sys.argv[1], sys.argv[2]
    mgr = CheckpointManager(root, io=IOOptions(min_split_bytes=1 << 20, file_bytes=1 << 20, threads=2))
    if 1 not in mgr.steps():
        mgr.save(1, state(1), epoch=1, metrics={"loss": 1.0})
    print("COMMITTED 1", flush=True)
    if point == "random":
        seed = int(sys.argv[3])
        delay = random.Random(seed).uniform(0.0, 0.25)
        threading.Timer(delay, die).start()
        step = 2
        while True:  # keep saving until the timer fires somewhere inside a save
            mgr.save(step, state(step, n=16, size=256 * 1024))
            print(f"COMMITTED {step}", flush=True)
            step += 1
    install(point)
    mgr.save(2, state(2))
    print("COMMITTED 2", flush=True)


if __name__ == "__main__":
    main()
