"""The ``ckptstore`` command line against S3 (a real moto server over HTTP), run as a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.format.manifest import step_dir
from ckptstore.storage import open_storage
from ckptstore.transfer import committed_steps, verify_step

from .conftest import REPO, cli, cli_env, cli_many, one_line, save_steps, train_state

pytestmark = [pytest.mark.cli, pytest.mark.s3]


def _flip_s3(s3_client, url: str, opts: dict, step: int, key: str) -> str:
    piece = CheckpointManager(url, storage_options=opts).manifest(step).tensors[key].pieces[0]
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    obj_key = f"{prefix}/{step_dir(step)}/{piece.file}"
    data = bytearray(s3_client.get_object(Bucket=bucket, Key=obj_key)["Body"].read())
    data[piece.start + 2] ^= 0x01
    s3_client.put_object(Bucket=bucket, Key=obj_key, Body=bytes(data))
    return piece.file


def test_ls_verify_and_cp_on_s3(s3_root, s3_client, tmp_path: Path, run_main) -> None:
    url, opts = s3_root
    j = json.dumps(opts)
    save_steps(url, {1: 0.9, 2: 0.4}, storage_options=opts)
    local = str(tmp_path / "local")
    ls, ver, down = cli_many(
        ["ls", url, "--storage-options", j, "--json"],
        ["verify", url, "--storage-options", j],
        ["cp", url, local, "--src-storage-options", j],
    )
    assert ls.code == 0, ls
    rows = ls.json()
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["metrics"] == {"loss": 0.4}
    assert rows[0]["nbytes"] > 0 and rows[0]["world_size"] == 1 and rows[0]["created_at"] > 0
    assert ver.code == 0 and "step 1: OK" in ver.out and "step 2: OK" in ver.out, ver
    assert down.code == 0 and "step 2: copied" in down.out, down
    assert CheckpointManager(local).steps() == [1, 2] and verify_step(open_storage(local), 2).ok

    fname = _flip_s3(s3_client, url, opts, 2, "model/conv2.weight")
    bad = cli("verify", url, "--storage-options", j, "--json")
    assert bad.code == 1, bad
    problems = [p for s in bad.json()["steps"] for p in s["problems"]]
    assert [(p["step"], p["file"], p["key"]) for p in problems] == [(2, fname, "model/conv2.weight")]
    assert "model/conv2.weight" in one_line(bad.err) and "step 2" in bad.err
    # local -> S3 (another prefix), options for the S3 side only; in-process (local -> S3 also runs as a
    # subprocess in the sync --watch test).
    copy_url = url + "-copy"
    up = run_main("cp", local, copy_url, "--dst-storage-options", j)
    assert up.code == 0 and "step 1: copied" in up.out, up
    mirror = CheckpointManager(copy_url, storage_options=opts)
    assert mirror.steps() == [1, 2] and verify_step(mirror, 1).ok and verify_step(mirror, 2).ok
    ref = CheckpointManager(local).load(2)
    got = mirror.load(2)
    assert all(torch.equal(got["model"][k], v) for k, v in ref["model"].items())


def test_sync_watch_to_s3_mirrors_new_steps_and_stops_on_sigint(s3_root, tmp_path: Path) -> None:
    url, opts = s3_root
    src = str(tmp_path / "src")
    src_mgr = save_steps(src, {1: 1.0})
    p = subprocess.Popen(
        [sys.executable, "-m", "ckptstore", "sync", src, url, "--watch", "--interval", "0.2",
         "--dst-storage-options", json.dumps(opts), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=str(REPO),
    )  # fmt: skip
    try:
        dst = open_storage(url, opts)

        def wait_for(step: int) -> None:
            deadline = time.monotonic() + 60
            while step not in committed_steps(dst):
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, f"step {step} was not mirrored"
                time.sleep(0.2)

        wait_for(1)
        model, opt = train_state(5)
        src_mgr.save(5, {"model": model, "optim": opt}, epoch=0, metrics={"loss": 0.2})
        wait_for(5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, (out, err)
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(e["event"], e["step"]) for e in events] == [("copied", 1), ("copied", 5)]
    assert "stopped" in one_line(err.split("\n", 1)[1]) and "Traceback" not in err
    mirror = CheckpointManager(url, storage_options=opts)
    assert mirror.info(5).metrics == {"loss": 0.2}
    got = mirror.load(5)
    assert all(torch.equal(got["model"][k], v) for k, v in model.state_dict().items())
