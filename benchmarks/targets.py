"""Where the benchmark writes: ``local`` disk, ``shm`` (/dev/shm, RAM) and the ``s3`` hook.

* ``local``: a fresh directory under ``$CKPTSTORE_BENCH_DIR`` or ``<repo>/bench-data`` (git-ignored), removed
  at the end of the run;
* ``shm``: a fresh directory under ``/dev/shm``, removed at the end;
* ``s3``: not implemented yet. To add it, implement :class:`S3Target` (start a moto server on 127.0.0.1 in
  ``setup``, create a bucket, return ``s3://bucket/<name>`` from ``location`` and the endpoint in
  ``storage_options``, stop it in ``cleanup``). Filesystem-only contenders (``Contender.fs_only``) are skipped
  on URL targets; ckptstore gets ``CheckpointManager(url, storage_options=...)``.

Run the suite with ``python -m benchmarks.run --target local,shm``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _fs_info(path: Path) -> dict[str, Any]:
    """Mount point, device, filesystem type and (for block devices) the disk model of ``path``."""
    best: tuple[str, str, str] = ("", "?", "?")
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, dev, fstype)
    except OSError:
        pass
    info: dict[str, Any] = {"path": str(path), "mount": best[0], "device": best[1], "fstype": best[2]}
    dev = os.path.basename(best[1])
    sys_block = Path("/sys/block") / dev
    if sys_block.exists():
        keys = (("rotational", "queue/rotational"), ("scheduler", "queue/scheduler"), ("model", "device/model"))
        for key, rel in keys:
            try:
                info[key] = (sys_block / rel).read_text().strip()
            except OSError:
                pass
    try:
        st = os.statvfs(path)
        info["free_gib"] = round(st.f_bavail * st.f_frsize / 2**30, 1)
    except OSError:
        pass
    return info


class Target:
    """A place to write checkpoints. ``location(name)`` is a directory path (or URL for remote targets)."""

    name = ""
    is_fs = True
    evictable = True
    """Whether clean page-cache pages of our files can be evicted (posix_fadvise) for cold reads."""

    def setup(self) -> None:
        raise NotImplementedError

    def location(self, name: str) -> str:
        raise NotImplementedError

    def storage_options(self) -> dict[str, Any] | None:
        return None

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"target": self.name}


class DirTarget(Target):
    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base
        self.root = base / f"ckptstore-bench-{os.getpid()}-{int(time.time())}"
        self._created_base = False

    def setup(self) -> None:
        self._created_base = not self.base.exists()
        self.root.mkdir(parents=True, exist_ok=False)

    def location(self, name: str) -> str:
        return str(self.root / name)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._created_base:
            try:
                self.base.rmdir()  # we created it; only removed when empty
            except OSError:
                pass

    def info(self) -> dict[str, Any]:
        return {"target": self.name, **_fs_info(self.base if self.base.exists() else self.base.parent)}


class S3Target(Target):
    """Hook for ``--target s3`` (moto server); not implemented in this version."""

    name = "s3"
    is_fs = False
    evictable = False

    def setup(self) -> None:
        raise NotImplementedError(
            "--target s3 is not implemented yet: see benchmarks/targets.py (S3Target) for the hook to fill in"
        )


def make_target(name: str) -> Target:
    if name == "local":
        base = Path(os.environ.get("CKPTSTORE_BENCH_DIR") or REPO / "bench-data")
        return DirTarget("local", base)
    if name == "shm":
        t = DirTarget("shm", Path("/dev/shm"))
        t.evictable = False  # tmpfs pages are the storage itself
        return t
    if name == "s3":
        return S3Target()
    raise ValueError(f"unknown target {name!r} (local, shm, s3)")
