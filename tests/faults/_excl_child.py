"""One of two processes racing ``LocalStorage.create_exclusive`` on the same names, with hard links disabled.

    python _excl_child.py ROOT WRITER ROUNDS BARRIER_DIR LINK_ERRNO NO_RENAME2  ->  one JSON line per round

``os.link`` raises ``OSError(LINK_ERRNO)`` (a filesystem without hard links). With NO_RENAME2=1 the
``renameat2(RENAME_NOREPLACE)`` step is unavailable too (EINVAL, as on NFS), so the commit is the O_EXCL create
of the final name. Each round both writers meet at a file barrier, then commit ``race-R/manifest.json`` with
their own content; the line records ``won`` / ``lost`` (``FileExistsError``) / anything else.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time

from ckptstore.storage import local as local_mod
from ckptstore.storage.local import LocalStorage


def barrier(d: str, name: str, writer: int, timeout: float = 60.0) -> None:
    open(os.path.join(d, f"{name}-{writer}"), "w").close()
    other = os.path.join(d, f"{name}-{1 - writer}")
    deadline = time.monotonic() + timeout
    while not os.path.exists(other):
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: the other writer never came")
        time.sleep(0.0002)


def content(writer: int, r: int) -> bytes:
    return (f"writer {writer} round {r};" * 4000).encode()  # ~100 KiB: several write() calls in place


def main() -> None:
    root, writer, rounds, bdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    code, disable_rename2 = int(sys.argv[5]), sys.argv[6] == "1"

    def no_link(*a: object, **k: object) -> None:
        raise OSError(code, os.strerror(code))

    def no_rename2(*a: object, **k: object) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    os.link = no_link  # type: ignore[assignment]
    if disable_rename2:
        local_mod._renameat2 = no_rename2
    st = LocalStorage(root)
    for r in range(rounds):
        st.makedirs(f"race-{r}")
        barrier(bdir, f"r{r}", writer)
        try:
            st.create_exclusive(f"race-{r}/manifest.json", content(writer, r))
            out = "won"
        except FileExistsError:
            out = "lost"
        except Exception as e:
            out = f"{type(e).__name__}: {e}"
        print(json.dumps({"round": r, "writer": writer, "result": out}), flush=True)
    print(json.dumps({"writer": writer, "all_or_nothing": st.create_all_or_nothing, "links": st.has_links}))


if __name__ == "__main__":
    main()
