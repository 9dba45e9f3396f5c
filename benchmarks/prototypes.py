"""Prototypes of proposed ckptstore changes, applied by monkeypatching inside one benchmark process.

They exist to put numbers on proposals for files the benchmark owner does not edit (``manager.py``); they are
not ckptstore's behaviour and rely on its private internals, so they may break when those change (they then
fail loudly). Select them with the ckptstore contender option ``proto=NAME``, e.g.::

    python -m benchmarks.run --workloads W1 --contenders raw,safetensors,ckptstore,ckptstore:proto=mmap_load

* ``mmap_load`` - adopted: the library does this by default now (``IOOptions.mmap_load``); kept to compare
  against its first version. ``load()`` on local storage maps each shard file copy-on-write (``MAP_PRIVATE``, like
  ``torch.load(mmap=True)`` and safetensors) and returns tensors that are views of the mapping, instead of
  allocating fresh memory and ``preadv``-ing into it; the crc32c verification then only faults page-cache pages
  in. Tensors that are not a whole, aligned, CPU piece fall back to the normal path.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def apply(name: str) -> None:
    if name == "mmap_load":
        _mmap_load()
    else:
        raise ValueError(f"unknown prototype {name!r} (mmap_load)")


def _mmap_load() -> None:
    import ckptstore.manager as M
    from ckptstore.errors import IntegrityError
    from ckptstore.format.manifest import step_dir
    from ckptstore.io import _parallel, crc32c, tensor_bytes
    from ckptstore.storage.local import LocalStorage

    orig_fresh = M.CheckpointManager._fresh

    def _load_from(
        self: Any, m: Any, map_location: Any, verify: bool | None, trusted: bool, storage: Any = None
    ) -> Any:
        storage = storage or self.storage
        self._check_trust(m, trusted)
        rc = M._ReadCtx(m, map_location, self.comm.rank)
        io = self._io_for(verify)
        prefix = step_dir(m.step)
        maps: dict[str, Any] = {}  # shard file -> its copy-on-write mapping (a torch UntypedStorage)
        mapped: list[tuple[str, Any, memoryview]] = []

        def fresh(key: str) -> torch.Tensor:
            e = self._entry(rc, key)
            p = e.pieces[0] if len(e.pieces) == 1 else None
            dt = e.torch_dtype
            if (
                not isinstance(storage, LocalStorage)
                or e.encoding != "raw"
                or p is None
                or p.offsets is not None
                or p.nbytes == 0
                or p.start % torch.empty(0, dtype=dt).element_size()
                or M._resolve_device(rc, key, e).type != "cpu"
            ):
                return orig_fresh(self, rc, key)
            st: Any = maps.get(p.file)
            if st is None:
                path = storage.full(f"{prefix}/{p.file}")
                st = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
                maps[p.file] = st
            t = torch.empty(0, dtype=dt).set_(st, p.start // t_itemsize(dt), e.shape)  # type: ignore[call-overload]
            mapped.append((key, p, tensor_bytes(t)))
            return t

        value = M.unflatten(m.tree, lambda key, node: fresh(key), rank=self.comm.rank)
        M.read_pieces(storage, prefix, rc.tasks, io, step=m.step)
        if io.verify:

            def check(item: tuple[str, Any, memoryview]) -> None:
                key, p, view = item
                got = crc32c(view)
                if got != p.crc32c:
                    raise IntegrityError(
                        f"checksum mismatch in step {m.step}, file {p.file}, key {key!r}", step=m.step, file=p.file,
                        key=key,
                    )  # fmt: skip

            _parallel(check, mapped, io.threads)
        return self._finalize(rc, value)

    M.CheckpointManager._load_from = _load_from  # type: ignore[method-assign]


def t_itemsize(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()
