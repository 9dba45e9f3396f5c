"""Fixtures of the fault matrix: the same row on file:// and on s3:// (a real moto server over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager, IOOptions
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.options import MiB
from tests.fixtures.dist import assert_bit_equal
from tests.fixtures.s3 import BUCKET


def io_options(**kw: Any) -> IOOptions:
    """Small shard files (several per save), 5 MiB S3 parts, so faults land between files and between parts."""
    base: dict[str, Any] = dict(
        threads=2,
        file_bytes=256 * 1024,
        min_split_bytes=256 * 1024,
        part_bytes=5 * MiB,
        single_put_bytes=5 * MiB,  # files over one part go multipart, as parts are what these faults target
        max_inflight_bytes=20 * MiB,
        read_chunk_bytes=1 * MiB,
    )
    base.update(kw)
    return IOOptions(**base)


def make_state(step: int, *, big: bool = False) -> dict[str, Any]:
    """A deterministic training-like state; ``big`` adds a 6 MiB tensor (a multipart upload on S3)."""
    g = torch.Generator().manual_seed(step)
    st: dict[str, Any] = {
        "model": {f"layer{i}.weight": torch.randn(64, 256, generator=g) for i in range(4)},
        "optim": {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(300, generator=g)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "extra": {"seen": 1000 * step, "rng": torch.randint(0, 2**31, (624,), generator=g)},
    }
    if big:
        st["big"] = torch.randn(6 * MiB // 4, generator=g)
    return st


def zeros_like_state(st: Any) -> Any:
    if isinstance(st, torch.Tensor):
        return torch.zeros_like(st)
    if isinstance(st, dict):
        return {k: zeros_like_state(v) for k, v in st.items()}
    if isinstance(st, list):
        return [zeros_like_state(v) for v in st]
    return st


@dataclass
class Backend:
    """One root on one backend, plus what the checks need to look behind the library's back."""

    name: str
    url: str
    opts: dict[str, Any] | None
    s3_client: Any = None
    path: Path | None = None

    def manager(self, **kw: Any) -> CheckpointManager:
        kw.setdefault("io", io_options())
        return CheckpointManager(self.url, storage_options=self.opts, **kw)

    def files(self) -> list[str]:
        """Every file/object under the root, relative to it."""
        if self.s3_client is not None:
            prefix = self.url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
            keys: list[str] = []
            for page in self.s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
                keys += [o["Key"][len(prefix) :] for o in page.get("Contents") or ()]
            return sorted(keys)
        assert self.path is not None
        if not self.path.exists():
            return []
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def uploads(self) -> list[str]:
        """Keys of incomplete multipart uploads under the root (S3 only)."""
        if self.s3_client is None:
            return []
        prefix = self.url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
        ups = self.s3_client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads") or []
        return [u["Key"] for u in ups]

    def read(self, rel: str) -> bytes:
        if self.s3_client is not None:
            key = self.url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/" + rel
            return bytes(self.s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert self.path is not None
        return (self.path / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        """Replace a file behind the library's back (corruption, hostile content)."""
        if self.s3_client is not None:
            key = self.url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/" + rel
            self.s3_client.put_object(Bucket=BUCKET, Key=key, Body=data)
            return
        assert self.path is not None
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def only_committed(self, mgr: CheckpointManager, steps: list[int]) -> None:
        """The root holds exactly the files of ``steps`` (manifest + the files it lists), no upload in flight."""
        expected = sorted(f"{step_dir(s)}/{f}" for s in steps for f in [*mgr.manifest(s).files, MANIFEST_NAME])
        left = [f for f in self.files() if not f.startswith("pins/")]
        assert left == expected, f"not only committed steps: extra {sorted(set(left) - set(expected))}, " \
            f"missing {sorted(set(expected) - set(left))}"  # fmt: skip
        assert self.uploads() == [], f"incomplete multipart uploads left: {self.uploads()}"


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "file":
        yield Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
        return
    url, opts = request.getfixturevalue("s3_root")
    yield Backend("s3", url, opts, s3_client=request.getfixturevalue("s3_client"))


def assert_state(got: Any, want: Any, what: str = "") -> None:
    assert_bit_equal(got, want, what)
