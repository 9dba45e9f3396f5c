"""Child for the special-files row: a newest manifest that is a FIFO, a link to /dev/zero, or a directory.

    python _special_child.py ROOT   ->  one JSON line per (case, call), then {"done": true}

Steps 1 and 2 are saved, then step 2's manifest.json is replaced by the case. Every call runs under a 10 s
``SIGALRM`` (a blocked ``open`` of a FIFO is interrupted: outcome ``"timeout"``) and the address space is limited
to what the process uses after setup plus 512 MiB (reading /dev/zero to the end fails instead of swapping the
machine: outcome ``MemoryError``). The outcome is ``"ok <value>"`` or the exception's type name.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ckptstore import CheckpointManager
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.storage.base import NotRegularFileError

MiB = 1 << 20


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmSize in /proc/self/status")


class Alarm(BaseException):
    pass


def on_alarm(signum: int, frame: Any) -> None:
    raise Alarm()


def main() -> None:
    root = sys.argv[1]
    mgr = CheckpointManager(root)
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    mgr.save(1, state)
    mgr.save(2, {"w": state["w"] + 1})
    CheckpointManager(root).restore({"w": torch.zeros(1000)}, step="latest")  # warm every path once
    manifest = os.path.join(root, step_dir(2), MANIFEST_NAME)
    os.unlink(manifest)
    signal.signal(signal.SIGALRM, on_alarm)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 512 * MiB, hard))

    def make(case: str) -> None:
        if os.path.lexists(manifest):
            if os.path.isdir(manifest) and not os.path.islink(manifest):
                shutil.rmtree(manifest)
            else:
                os.unlink(manifest)
        if case == "fifo":
            os.mkfifo(manifest)
        elif case == "link to /dev/zero":
            os.symlink("/dev/zero", manifest)
        elif case == "directory":
            os.mkdir(manifest)
            with open(os.path.join(manifest, "inner"), "wb") as f:
                f.write(b"x")

    def run(case: str, call: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        detail = ""
        signal.alarm(10)
        try:
            outcome = f"ok {fn()}"
        except Alarm:
            outcome = "timeout"
        except BaseException as e:  # each a finding: MemoryError, an untyped error, ...
            outcome = type(e).__name__
            if isinstance(e, NotRegularFileError) and outcome != "NotRegularFileError":
                outcome = f"{outcome}(NotRegularFileError)"  # the manager's typed copy of the storage error
            detail = str(e)[:300]
        finally:
            signal.alarm(0)
        row = {"case": case, "call": call, "outcome": outcome, "seconds": round(time.perf_counter() - t0, 3)}
        row["detail"] = detail
        print(json.dumps(row), flush=True)

    rel = f"{step_dir(2)}/{MANIFEST_NAME}"
    for case in ("fifo", "link to /dev/zero", "directory"):
        make(case)
        st = CheckpointManager(root).storage
        run(case, "read_bytes", lambda st=st: len(st.read_bytes(rel)))
        run(case, "read_bytes range", lambda st=st: len(st.read_bytes(rel, 0, 64)))
        run(case, "read_into", lambda st=st: st.read_into(rel, 0, [memoryview(bytearray(1 << 20))]))
        run(case, "map_private", lambda st=st: st.map_private(rel))
        run(case, "size", lambda st=st: st.size(rel))

        def restore_latest() -> int:
            target = {"w": torch.zeros(1000)}
            info = CheckpointManager(root).restore(target, step="latest")
            assert torch.equal(target["w"], state["w"]), "restored wrong bytes"
            return int(info.step)

        run(case, "restore latest", restore_latest)
        run(case, "steps", lambda: CheckpointManager(root).steps())
    print(json.dumps({"done": True}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # a reader thread may still be blocked on a FIFO in old code


if __name__ == "__main__":
    main()
