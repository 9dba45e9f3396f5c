"""One of two writers saving the same steps under one root at the same time.

    python _writer_child.py URL OPTS_JSON WRITER_ID ROUNDS BARRIER_DIR  ->  one JSON line per round

Round r saves step r with this writer's own state (see ``writer_state``). Both writers start each round together
(a file barrier); in even rounds they also meet again right before the commit (``create_exclusive``), so both
conditional creates of the manifest really race. Odd rounds race freely (usually one writer already sees the
other's manifest when it starts).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointExistsError
from tests.faults.conftest import io_options
from tests.fixtures.faulty import Fault, inject


def writer_state(writer: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(writer * 100_000 + step)
    return {"w": torch.randn(64, 512, generator=g), "b": torch.randn(700, generator=g), "who": {"writer": writer}}


def barrier(d: str, name: str, writer: int, timeout: float = 60.0) -> None:
    open(os.path.join(d, f"{name}-{writer}"), "w").close()
    other = os.path.join(d, f"{name}-{1 - writer}")
    deadline = time.monotonic() + timeout
    while not os.path.exists(other):
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: the other writer never came")
        time.sleep(0.0005)


def main() -> None:
    url, opts, writer, rounds, bdir = (
        sys.argv[1],
        json.loads(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    mgr = CheckpointManager(url, storage_options=opts, io=io_options())
    state_round = {"r": 0}

    def at_commit(ev: Any) -> None:
        if state_round["r"] % 2 == 0:
            barrier(bdir, f"commit{state_round['r']}", writer)

    inject(mgr, Fault("call", op="create_exclusive", fn=at_commit, times=None))
    for r in range(1, rounds + 1):
        state_round["r"] = r
        barrier(bdir, f"start{r}", writer)
        try:
            mgr.save(r, writer_state(writer, r))
            out = "committed"
        except CheckpointExistsError as e:
            # Lost at the commit itself (the conditional create of the manifest) or already at the start.
            out = "CheckpointExistsError@" + ("commit" if "while this save ran" in str(e) else "start")
        except Exception as e:
            out = f"{type(e).__name__}: {e}"
        if r % 2 == 0 and out != "committed" and not os.path.exists(os.path.join(bdir, f"commit{r}-{writer}")):
            # Lost before reaching the commit: release the other writer waiting at the commit barrier.
            open(os.path.join(bdir, f"commit{r}-{writer}"), "w").close()
        print(json.dumps({"round": r, "writer": writer, "result": out}), flush=True)


if __name__ == "__main__":
    main()
