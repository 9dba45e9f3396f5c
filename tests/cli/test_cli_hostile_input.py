"""The CLI on hostile or mistaken input: typed one-line errors with the documented exit codes, never an
"internal error", never a hang, never raw terminal control characters.

- URLs: ``''`` (which would list the current directory) and bucketless ``s3://`` are usage errors (exit 2);
- ``import`` of a text file, an empty file, a damaged pickle or a FIFO: exit 4, "not a checkpoint" & co., at once;
- values that need pickle and pickled objects in a foreign file: the message names the CLI's ``--trusted``
  (the Python API's names ``trusted=True``; neither says ``allow_pickle``);
- S3 without credentials (``ls``/``show``/``verify``/``diff``/``gc``/``cp``): exit 4, "no S3 credentials", bounded;
- metric names and state keys with ANSI escapes are printed escaped (``\\x1b``), and so are error messages.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.errors import ManifestError, UnsafeCheckpointError, UnsupportedValueError
from ckptstore.interop import import_external
from tests.cli.conftest import REPO, cli_env, one_line

pytestmark = pytest.mark.cli


def test_empty_and_bucketless_urls_are_usage_errors(run_main, tmp_path: Path, monkeypatch) -> None:
    root = str(tmp_path / "ckpt")
    CheckpointManager(root).save(1, {"w": torch.ones(2)})
    monkeypatch.chdir(root)  # '' must not quietly mean the current directory
    for argv in (["ls", ""], ["ls", "  "], ["show", "", "1"], ["verify", ""], ["cp", "", root], ["cp", root, ""],
                 ["diff", root, "1", "1", "--b-url", ""], ["import", "", root, "--step", "1"]):  # fmt: skip
        r = run_main(*argv)
        assert r.code == 2 and "usage error" in one_line(r.err) and "empty" in r.err, (argv, r)
    for url in ("s3://", "s3:///run", "gs://"):
        r = run_main("ls", url)
        assert r.code == 2 and "names no bucket" in one_line(r.err), r
        assert "internal error" not in r.err


@pytest.fixture
def junk(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    return {"text": text, "empty": empty, "damaged": damaged}


def test_import_of_files_that_are_not_checkpoints(run_main, tmp_path: Path, junk: dict[str, Path]) -> None:
    root = str(tmp_path / "ckpt")
    for name, path in junk.items():
        r = run_main("import", str(path), root, "--step", "1")
        line = one_line(r.err)
        assert r.code == 4 and line.startswith("ckptstore import: error:") and "internal error" not in line, r
        assert "not a" in line, (name, line)
    r = run_main("import", str(junk["text"]), root, "--step", "1")
    assert "not a checkpoint" in r.err and "torch.distributed.checkpoint directory" in r.err
    r = run_main("import", str(tmp_path), root, "--step", "1")  # a directory without .metadata
    assert r.code == 4 and "without .metadata" in one_line(r.err)
    with pytest.raises(ManifestError):
        import_external(junk["text"], CheckpointManager(root), 1)


@pytest.mark.timeout(120)
def test_import_of_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: none does
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "ckptstore", "import", str(fifo), str(tmp_path / "c"), "--step",
                            "1"], capture_output=True, text=True, timeout=60, env=cli_env(), cwd=str(REPO))  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("ckptstore import of a FIFO hung")
    assert p.returncode == 4 and "not a regular file" in one_line(p.stderr), p.stderr
    assert time.monotonic() - start < 60


def test_values_that_need_pickle_name_the_callers_switch(run_main, tmp_path: Path) -> None:
    needs = tmp_path / "set.pt"
    torch.save({"w": torch.ones(2), "s": {1, 2}}, needs)  # weights_only loads it; ckptstore stores sets pickled
    pickled = tmp_path / "date.pt"
    torch.save({"w": torch.ones(2), "when": datetime.date(2024, 1, 2)}, pickled)  # weights_only refuses it
    root = str(tmp_path / "ckpt")
    r = run_main("import", str(needs), root, "--step", "1")
    line = one_line(r.err)
    assert r.code == 4 and "--trusted" in line and "allow_pickle" not in line and "set" in line, r
    r = run_main("import", str(pickled), root, "--step", "2")
    line = one_line(r.err)
    assert r.code == 4 and "refused" in line and "--trusted" in line and "datetime.date" in line, r
    assert "trusted=True" not in line.split("(")[0] and "\x1b" not in r.err  # torch's ANSI styling is dropped
    # The Python API names its parameter.
    mgr = CheckpointManager(root)
    with pytest.raises(UnsupportedValueError) as ei:
        import_external(needs, mgr, 1)
    assert "trusted=True" in str(ei.value) and "--trusted" not in str(ei.value) and "allow_pickle" not in str(ei.value)
    with pytest.raises(UnsafeCheckpointError) as ei2:
        import_external(pickled, mgr, 2)
    assert "trusted=True" in str(ei2.value) and "--trusted" not in str(ei2.value)
    # With --trusted both import (sets and dates stored pickled; loading them needs trusted=True).
    assert run_main("import", str(needs), root, "--step", "1", "--trusted").code == 0
    assert run_main("import", str(pickled), root, "--step", "2", "--trusted").code == 0
    assert mgr.load(1, trusted=True)["s"] == {1, 2} and mgr.load(2, trusted=True)["when"] == datetime.date(2024, 1, 2)
    # export: the CLI says --trusted / --force, Python says trusted=True / overwrite=True.
    r = run_main("export", root, "2", str(tmp_path / "out.safetensors"))
    assert r.code == 4 and "--trusted" in one_line(r.err) and "trusted=True" not in r.err, r
    r = run_main("export", root, "2", str(tmp_path / "out.pt"))
    assert r.code == 4 and "--trusted" in one_line(r.err) and "trusted=True" not in r.err, r
    assert run_main("export", root, "2", str(tmp_path / "out.pt"), "--trusted").code == 0
    r = run_main("export", root, "2", str(tmp_path / "out.pt"), "--trusted")
    assert r.code == 4 and "--force" in one_line(r.err) and "overwrite=True" not in r.err, r


def _no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "CKPTSTORE_STORAGE_OPTIONS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.timeout(120)
def test_s3_without_credentials_is_a_typed_error(run_main, tmp_path: Path, monkeypatch) -> None:
    _no_credentials(monkeypatch, tmp_path)
    local = str(tmp_path / "local")
    CheckpointManager(local).save(1, {"w": torch.ones(2)})
    # A closed port on 127.0.0.1: nothing is ever sent anyway, signing fails first.
    opts = '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}}'
    url = "s3://no-such-bucket/run"
    for argv in (["ls", url], ["show", url, "1"], ["verify", url], ["diff", url, "1", "2"], ["gc", url],
                 ["diff", local, "1", "1", "--b-url", url], ["cp", local, url]):  # fmt: skip
        start = time.monotonic()
        r = run_main(*argv, "--storage-options", opts)
        line = r.err.strip().splitlines()[-1] if r.err.strip() else ""
        assert r.code == 4 and "internal error" not in r.err, (argv, r)
        assert "no S3 credentials" in line and "AWS_ACCESS_KEY_ID" in line, (argv, r)
        assert time.monotonic() - start < 30, argv


def test_control_characters_from_checkpoints_are_escaped(run_main, tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    evil = "\x1b]0;pwned\x07\x1b[2J\x9b31m"
    CheckpointManager(root).save(1, {"w": torch.ones(2), evil: torch.zeros(1)}, metrics={evil: 1.0},
                                 metadata={"note": evil})  # fmt: skip
    for argv in (["ls", root, "--plain"], ["show", root, "1", "--plain"], ["show", root, "1", "--json"],
                 ["ls", root, "--json"]):  # fmt: skip
        r = run_main(*argv)
        assert r.code == 0, r
        for c in ("\x1b", "\x07", "\x9b"):
            assert c not in r.out and c not in r.err, (argv, r.out)
    r = run_main("show", root, "1", "--json")
    assert "\\u001b]0;pwned\\u0007" in r.out and "\\u009b31m" in r.out  # still there, escaped
    r = run_main("import", str(tmp_path / f"x{evil}.pt"), root, "--step", "2")
    assert r.code == 3 and "\x1b" not in r.err and "\\x1b" in r.err, r
