"""Where the benchmark writes: ``local`` disk, ``shm`` (/dev/shm, RAM) and ``s3`` (a moto server on loopback).

* ``local``: a fresh directory under ``$CKPTSTORE_BENCH_DIR`` or ``<repo>/bench-data`` (git-ignored), removed
  at the end of the run;
* ``shm``: a fresh directory under ``/dev/shm``, removed at the end;
* ``s3``: a moto server in its own process on 127.0.0.1 and an ephemeral port (``start_moto`` of
  ``benchmarks/s3_storage_probe.py``), a bucket, and a fresh prefix per run: ``location(name)`` is
  ``s3://ckptstore-bench/<run>/<name>``, ``storage_options()`` carries the endpoint and fake credentials.
  moto keeps objects in memory/temp files and its CPU is shared with the client on this machine, so absolute
  S3 numbers are moto's; the ratios compare clients on the same server in the same round. Filesystem-only
  contenders (``Contender.fs_only``) are skipped on URL targets.

Run the suite with ``python -m benchmarks.run --target local,shm,s3``.
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

    def files(self, loc: str) -> list[int]:
        """Sizes of the files (objects) under ``loc``, for the files/bytes columns."""
        raise NotImplementedError

    def server_cpu(self) -> float | None:
        """CPU seconds used so far by the storage server process (moto), if there is one."""
        return None

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

    def files(self, loc: str) -> list[int]:
        return [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(loc) for f in fs]

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
    """A moto S3 server in its own process on 127.0.0.1 (ephemeral port), one bucket, a prefix per run."""

    name = "s3"
    is_fs = False
    evictable = False

    def __init__(self) -> None:
        from .s3util import BUCKET

        self.bucket = BUCKET
        self.prefix = f"ckptstore-bench-{os.getpid()}-{int(time.time())}"
        self.endpoint = ""
        self._stop: Any = None
        self._cpu: Any = None
        self._client: Any = None

    def setup(self) -> None:
        # Imported here: the probe module imports ckptstore's S3 storage, not needed for local runs.
        from .s3_storage_probe import start_moto
        from .s3util import botocore_client

        # Its own process: moto's CPU (the bottleneck on 2 cores) is then visible, and not under our GIL.
        self.endpoint, self._stop, self._cpu = start_moto(inproc=False)
        try:
            self._client = botocore_client(self.storage_options())
            self._client.create_bucket(Bucket=self.bucket)
        except BaseException:
            self.cleanup()
            raise

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/{name}"

    def storage_options(self) -> dict[str, Any] | None:
        from .s3util import storage_options

        return storage_options(self.endpoint)

    def _objects(self, key_prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key_prefix):
            out.extend(page.get("Contents", []))
        return out

    def remove(self, name: str) -> None:
        keys = [o["Key"] for o in self._objects(f"{self.prefix}/{name}/")]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def files(self, loc: str) -> list[int]:
        from .s3util import split_url

        _, key = split_url(loc)
        return [int(o["Size"]) for o in self._objects(key + "/")]

    def server_cpu(self) -> float | None:
        return self._cpu() if self._cpu is not None else None

    def cleanup(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._stop is not None:
            self._stop()  # moto keeps everything in memory: stopping it frees all objects at once
            self._stop = None

    def info(self) -> dict[str, Any]:
        try:
            from importlib.metadata import version

            moto = version("moto")
        except Exception:
            moto = "?"
        return {
            "target": self.name,
            "path": f"{self.endpoint or 'http://127.0.0.1:<ephemeral>'} bucket {self.bucket}",
            "fstype": f"moto {moto} server (own process)",
        }


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
