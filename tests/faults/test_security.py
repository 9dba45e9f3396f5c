"""Security rows, on file:// and s3://: malicious pickles never run, paths never leave the step prefix.

- a step holding a malicious pickle (its ``__reduce__`` creates a sentinel file): ``load``/``restore``/
  ``info``/``verify`` through the API and ``ckptstore verify/show/export/import`` through the CLI never create
  the sentinel; a manifest tampered to smuggle the pickle past the trust check is refused or read as bytes;
- state keys like ``../../x``, ``/abs``, ``s3://other-bucket/k`` stay names inside the step prefix;
- manifest file references that are ``../``, absolute, or foreign URLs → ``UnsafeCheckpointError`` before any
  byte is read (on S3: no request ever reaches the other bucket).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import CheckpointError, ManifestError, UnsafeCheckpointError
from ckptstore.format.manifest import MANIFEST_NAME, step_dir
from ckptstore.transfer import verify_step
from tests.faults.conftest import Backend, assert_state, io_options
from tests.faults.forge import sign
from tests.fixtures.faulty import inject
from tests.fixtures.s3 import BUCKET, S3Faults

pytestmark = [pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]


class Evil:
    """Unpickling this creates ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


CLI_CHILD = r"""
import contextlib, io, json, sys
from ckptstore.cli import main
url, opts, out_dir, evil_pt = sys.argv[1:5]
extra = ["--storage-options", opts] if opts != "null" else []
cmds = {
    "verify": ["verify", url, *extra],
    "verify 1": ["verify", url, "1", *extra],
    "show 1": ["show", url, "1", *extra],
    "show latest --json": ["show", url, "latest", "--json", *extra],
    "export .pt": ["export", url, "1", out_dir + "/out.pt", *extra],
    "export .safetensors": ["export", url, "1", out_dir + "/out.safetensors", *extra],
    "import evil.pt": ["import", evil_pt, url, "--step", "9", *extra],
}
res = {}
for name, argv in cmds.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    res[name] = {"code": code, "out": out.getvalue()[-2000:], "err": err.getvalue()[-2000:]}
print(json.dumps(res))
"""


def test_malicious_pickle_never_runs(backend: Backend, tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    mgr = backend.manager()
    state = {"w": torch.arange(10.0), "evil": Evil(str(sentinel))}
    with pytest.raises(CheckpointError, match="allow_pickle"):
        mgr.save(1, state)
    mgr.save(1, state, allow_pickle=True)
    fresh = backend.manager()
    for call in (
        lambda: fresh.load(1),
        lambda: fresh.load(),
        lambda: fresh.restore({"w": torch.zeros(10)}),
        lambda: fresh.restore({"w": torch.zeros(10)}, step=1, strict=False),
    ):
        with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
            call()
    assert fresh.info(1).step == 1 and verify_step(fresh.storage, 1).ok  # metadata and checksums: no unpickling
    assert fresh.gc(min_age_seconds=0) == []

    # Through the CLI (the same entry point as the ckptstore console script), in a separate process.
    evil_pt = tmp_path / "evil.pt"
    torch.save({"x": Evil(str(sentinel))}, evil_pt)
    proc = subprocess.run(
        [sys.executable, "-c", CLI_CHILD, backend.url, json.dumps(backend.opts), str(tmp_path), str(evil_pt)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["verify"]["code"] == 0 and res["verify 1"]["code"] == 0, res
    assert res["show 1"]["code"] == 0 and "pickled" in res["show 1"]["out"], res["show 1"]
    assert res["show latest --json"]["code"] == 0, res["show latest --json"]
    for name in ("export .pt", "export .safetensors", "import evil.pt"):
        assert res[name]["code"] == 4 and "trusted" in res[name]["err"], (name, res[name])
    assert not (tmp_path / "out.pt").exists()
    assert not sentinel.exists(), "a pickle from the checkpoint was executed"

    # A manifest tampered to hide the pickle from the trust check: the step says "raw" where it held a pickle.
    rel = f"{step_dir(1)}/{MANIFEST_NAME}"
    doc = json.loads(backend.read(rel))
    doc["tensors"]["evil"].pop("encoding")
    # crc32c is no signature: a tamperer can recompute the manifest's self-checksum, so re-sign the edit and
    # check that the consistency checks hold on their own.
    backend.write(rel, _resign(doc))
    with pytest.raises(ManifestError, match="pickle"):  # the tree still says "pickle": inconsistent, refused
        backend.manager().load(1)
    for node in (n for n in doc["tree"]["v"] if isinstance(n, dict) and n.get("t") == "pickle"):
        node["t"] = "tensor"
        node.pop("cls", None)
    backend.write(rel, _resign(doc))
    got = backend.manager().load(1)  # consistent now: the pickle's bytes come back as a uint8 tensor, inert
    assert got["evil"].dtype == torch.uint8 and torch.equal(got["w"], torch.arange(10.0))
    assert not sentinel.exists()


def _resign(doc: dict) -> bytes:
    """Serialise an edited manifest with a matching self-checksum (what a deliberate tamperer would do)."""
    return sign(doc)


HOSTILE_KEYS = ["../../x", "a/../../../b", "/abs/path", "s3://other-bucket/k", "..", "C:\\win\\x", "%2e%2e%2fx", ""]


def test_hostile_state_keys_stay_inside_the_step(backend: Backend, tmp_path: Path) -> None:
    state = {k: torch.full((3,), float(i)) for i, k in enumerate(HOSTILE_KEYS)}
    state["nested"] = {"../..": {"../../../etc/passwd": torch.ones(2)}}
    mgr = backend.manager()
    mgr.save(1, state, metadata={"note": "../../../x"})
    assert_state(backend.manager().load(1), state)
    files = backend.files()
    assert files and all(f.startswith(f"{step_dir(1)}/") for f in files), files
    if backend.s3_client is None:
        outside = [p for p in tmp_path.rglob("*") if p.is_file() and "ck" not in p.relative_to(tmp_path).parts]
        assert outside == [], outside
    else:
        c = backend.s3_client
        assert [b["Name"] for b in c.list_buckets()["Buckets"]] == [BUCKET]
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET).get("Contents") or ()]
        assert all(k.startswith(f"run/{step_dir(1)}/") for k in keys), keys
    for name in ("../../evil", "/abs", "a/b", ".."):
        with pytest.raises(CheckpointError, match="invalid artifact name"):
            mgr.save_artifact(1, name, object())
    assert backend.files() == files


EVIL_REFS = ["../x.safetensors", f"../{step_dir(1)}/secret.safetensors", "/etc/passwd", "s3://other-bucket/secret",
             "file:///etc/passwd", "..", "a/b", "%2e%2e%2fsecret"]  # fmt: skip


def _with_ref(doc: dict[str, Any], evil: str) -> bytes:
    d = json.loads(json.dumps(doc))
    (name,) = [n for n in d["files"] if n.endswith(".safetensors")][:1] or [None]
    d["files"] = {evil: d["files"].pop(name), **d["files"]}
    for e in d["tensors"].values():
        for p in e["pieces"]:
            if p["file"] == name:
                p["file"] = evil
    return sign(d)  # a valid self-checksum: the path check must refuse it on its own


def _check_refused(b: Backend, mgr_factory: Any, doc: dict[str, Any], refs: list[str] = EVIL_REFS) -> None:
    rel = f"{step_dir(2)}/{MANIFEST_NAME}"
    for evil in refs:
        b.write(rel, _with_ref(doc, evil))
        mgr = mgr_factory()
        fs = inject(mgr)
        for call in (lambda m: m.load(2), lambda m: m.restore({"w": torch.zeros(4)}, step=2), lambda m: m.info(2)):
            with pytest.raises(UnsafeCheckpointError):
                call(mgr)
        reads = [e for e in fs.events if e.op in ("read_into", "read_bytes") and not e.rel.endswith(MANIFEST_NAME)]
        assert reads == [], (evil, reads)  # refused before any data byte was read
        # "latest" does not skip a hostile step silently (as it skips a damaged one): it refuses it loudly, and
        # the previous step restores when asked for.
        target = {"w": torch.zeros(4)}
        with pytest.raises(UnsafeCheckpointError):
            mgr.restore(target)
        assert torch.equal(target["w"], torch.zeros(4))
        assert mgr.restore(target, step=1).step == 1
        assert torch.equal(target["w"], torch.ones(4))
        reads = [e for e in fs.events if e.op in ("read_into", "read_bytes") and f"{step_dir(2)}/" in e.rel]
        assert [e.rel for e in reads] == [rel] * len(reads), (evil, reads)  # only the manifest of step 2
        res = verify_step(mgr_factory().storage, 2)
        assert not res.ok and "plain name" in res.problems[0].message, (evil, res.problems)


def _two(b: Backend, mgr_factory: Any) -> dict[str, Any]:
    mgr = mgr_factory()
    mgr.save(1, {"w": torch.ones(4)})
    mgr.save(2, {"w": torch.full((4,), 2.0)})
    return json.loads(b.read(f"{step_dir(2)}/{MANIFEST_NAME}"))


def test_path_escape_in_manifest_is_refused_file(tmp_path: Path) -> None:
    b = Backend("file", f"file://{tmp_path}/ck", None, path=tmp_path / "ck")
    (tmp_path / "x.safetensors").write_bytes(b"outside the root")
    _check_refused(b, b.manager, _two(b, b.manager))


@pytest.mark.s3
def test_path_escape_in_manifest_is_refused_s3(s3_faults: S3Faults, s3_client: Any) -> None:
    s3_client.create_bucket(Bucket="other-bucket")
    s3_client.put_object(Bucket="other-bucket", Key="secret", Body=b"someone else's data")
    b = Backend("s3", s3_faults.url, s3_faults.storage_options, s3_client=s3_client)

    def factory() -> CheckpointManager:
        return CheckpointManager(b.url, storage_options=b.opts, io=io_options())

    doc = _two(b, factory)
    s3_faults.reset_log()
    _check_refused(b, factory, doc, ["../x.safetensors", "/etc/passwd", "s3://other-bucket/secret", "..", "a/b"])
    assert s3_faults.requests, "the proxy saw no request: the check would prove nothing"
    assert not [r for r in s3_faults.requests if r.path.startswith("/other-bucket")]
