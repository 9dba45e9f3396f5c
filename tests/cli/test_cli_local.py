"""The ``ckptstore`` command line, run as a subprocess against local roots."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptstore import CheckpointManager
from ckptstore.cli import build_parser
from ckptstore.format.manifest import step_dir
from ckptstore.storage import open_storage
from ckptstore.transfer import committed_steps, verify_step

from .conftest import REPO, TheModelClass, cli, cli_env, cli_many, one_line, save_steps, train_state

pytestmark = pytest.mark.cli

COMMANDS = ("ls", "show", "verify", "cp", "sync", "export", "import", "diff", "prune", "gc")


def _flip(root: str, step: int, key: str) -> str:
    mgr = CheckpointManager(root)
    piece = mgr.manifest(step).tensors[key].pieces[0]
    path = mgr.storage.full(f"{step_dir(step)}/{piece.file}")
    with open(path, "r+b") as f:
        f.seek(piece.start + 7)
        b = f.read(1)
        f.seek(piece.start + 7)
        f.write(bytes([b[0] ^ 0x10]))
    return piece.file


def test_help_usage_errors_and_examples(run_main, tmp_path: Path) -> None:
    r, usage, missing = cli_many(["--help"], ["ls"], ["ls", str(tmp_path / "nope")])
    assert r.code == 0, r
    assert all(c in r.out for c in COMMANDS) and "exit codes" in r.out and "3  not found" in r.out
    assert usage.code == 2 and "usage error" in one_line(usage.err)
    assert missing.code == 3 and "no checkpoint root" in one_line(missing.err)
    # Every command's help has an example and the exit codes (in-process: the same parser).
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example" in text and f"ckptstore {name}" in text and "exit codes" in text, name
    r = run_main("verify", "--help")
    assert r.code == 0 and "ckptstore verify ./checkpoints" in r.out
    r = run_main("--storage-options", "[1]", "ls", "somewhere")
    assert r.code == 2 and "--storage-options must be a JSON object" in one_line(r.err)
    r = run_main("show", "somewhere", "x1")
    assert r.code == 2 and "invalid step" in one_line(r.err)


def test_ls_and_show(tutorial_root: str, run_main, monkeypatch: pytest.MonkeyPatch) -> None:
    r, rj, rs, rsj = cli_many(
        ["ls", tutorial_root],
        ["ls", tutorial_root, "--json"],
        ["show", tutorial_root, "20"],
        ["show", tutorial_root, "best", "--json"],
    )
    assert r.code == 0, r
    lines = r.out.splitlines()
    lines_text = r.out
    assert lines[0].split()[:3] == ["step", "epoch", "metrics"]
    assert [ln.split()[0] for ln in lines[1:]] == ["10", "20", "30"]
    assert "loss=0.5" in r.out and "world size" in lines[0]
    rows = rj.json()
    mgr = CheckpointManager(tutorial_root)
    assert [x["step"] for x in rows] == [10, 20, 30]
    for x in rows:
        assert {"step", "epoch", "metrics", "nbytes", "world_size", "created_at"} <= set(x)
        info = mgr.info(x["step"])
        assert (x["epoch"], x["metrics"], x["nbytes"], x["world_size"]) == (info.epoch, info.metrics, info.nbytes, 1)
        assert x["created_at"] == pytest.approx(info.created_at)
    # rich rendering (forced as if on a terminal) shows the same rows.
    r = run_main("ls", tutorial_root, env={"CKPTSTORE_FORCE_TERMINAL": "1"})
    assert r.code == 0 and all(s in r.out for s in ("10", "20", "30", "loss=0.9")), r
    # rich is optional: without it the terminal gets the plain table.
    import ckptstore.cli

    monkeypatch.setattr(ckptstore.cli, "_rich", lambda: None)
    r2 = run_main("ls", tutorial_root, env={"CKPTSTORE_FORCE_TERMINAL": "1"})
    assert r2.code == 0 and r2.out == lines_text, r2

    assert rs.code == 0, rs
    out = rs.out
    # The tutorial's printout: "conv1.weight \t torch.Size([6, 3, 5, 5])", optimizer param_groups as a dict.
    assert "model's state_dict (" in out
    assert "conv1.weight \t torch.Size([6, 3, 5, 5]) \t torch.float32" in out
    assert "fc3.bias \t torch.Size([10]) \t torch.float32" in out
    assert "state/0/momentum_buffer \t torch.Size([6, 3, 5, 5])" in out
    assert "param_groups \t [{'lr': 0.001, 'momentum': 0.9, 'dampening': 0" in out
    assert "extra \t {'seen': 200}" in out and "metrics:    loss=0.5" in out

    doc = rsj.json()
    assert doc["step"] == 20 and doc["metrics"] == {"loss": 0.5} and doc["epoch"] == 2
    by_key = {t["key"]: t for t in doc["tensors"]}
    assert by_key["model/conv1.weight"]["shape"] == [6, 3, 5, 5] and by_key["model/conv1.weight"]["dtype"] == "float32"
    assert set(by_key) == set(mgr.manifest(20).tensors)
    (pg,) = [v for v in doc["values"] if v["path"] == "param_groups"]
    assert pg["section"] == "optim" and pg["value"][0]["lr"] == 0.001


def test_verify_detects_a_flipped_byte(tutorial_root: str, run_main) -> None:
    doc = run_main("verify", tutorial_root, "--json").json()
    assert doc["ok"] and [s["step"] for s in doc["steps"]] == [10, 20, 30]
    fname = _flip(tutorial_root, 20, "model/fc1.weight")
    r = cli("verify", tutorial_root)
    assert r.code == 1, r
    assert "step 10: OK" in r.out and "step 20: FAILED" in r.out and "step 30: OK" in r.out
    line = r.err.strip().splitlines()[-1]
    assert "verification failed" in line and "step 20" in line and fname in line and "'model/fc1.weight'" in line
    rj = run_main("verify", tutorial_root, "20", "--json")
    assert rj.code == 1
    (bad,) = rj.json()["steps"]
    assert bad["ok"] is False
    assert [(p["step"], p["file"], p["key"]) for p in bad["problems"]] == [(20, fname, "model/fc1.weight")]
    r = run_main("verify", tutorial_root, "10", "30", env={"CKPTSTORE_FORCE_TERMINAL": "1"})  # + progress bar
    assert r.code == 0 and "step 10: OK" in r.out, r
    r = run_main("verify", tutorial_root, "25")
    assert r.code == 3 and "25" in one_line(r.err)


def test_not_found_and_other_error_codes(tutorial_root: str, tmp_path: Path, run_main) -> None:
    r = run_main("show", tutorial_root, "99")
    assert r.code == 3 and "step 99" in one_line(r.err)
    r = run_main("-v", "show", tutorial_root, "99")
    assert r.code == 3 and "Traceback" in r.err  # -v shows the traceback
    r = run_main("import", str(tmp_path / "missing.pt"), tutorial_root, "--step", "1")
    assert r.code == 3 and "missing.pt" in one_line(r.err)


def test_cp_and_sync_between_local_roots(tutorial_root: str, tmp_path: Path, run_main) -> None:
    dst = str(tmp_path / "mirror")
    r = cli("cp", tutorial_root, dst, "--step", "20")
    assert r.code == 0 and "step 20: copied" in r.out, r
    doc = run_main("cp", tutorial_root, dst, "--json").json()
    assert [c["step"] for c in doc["copied"]] == [10, 30] and doc["skipped"] == [20] and doc["failed"] == []
    src_mgr, dst_mgr = CheckpointManager(tutorial_root), CheckpointManager(dst)
    assert dst_mgr.steps() == [10, 20, 30]
    for s in (10, 20, 30):
        assert verify_step(dst_mgr, s).ok
        assert dst_mgr.manifest(s).to_bytes() == src_mgr.manifest(s).to_bytes()
    # New work on the source: a step and an artifact on an existing step.
    save_steps(tutorial_root, {40: 0.4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        src_mgr.save_artifact(30, "head", torch.jit.script(torch.nn.Linear(3, 2)))
    r = cli("sync", tutorial_root, dst)
    assert r.code == 0 and "step 40: copied" in r.out and "step 30: artifacts copied: head" in r.out, r
    assert [a.name for a in CheckpointManager(dst).artifacts(30)] == ["head"]
    assert run_main("sync", tutorial_root, dst, "--json").json() == {"copied": [], "failed": []}
    r = run_main("cp", tutorial_root, tutorial_root)
    assert r.code == 2 and "same root" in one_line(r.err)
    r = run_main("cp", tutorial_root, dst, "--step", "99")
    assert r.code == 3 and "99" in one_line(r.err)


def test_cp_refuses_corrupt_source(tutorial_root: str, tmp_path: Path) -> None:
    fname = _flip(tutorial_root, 30, "optim/state/0/momentum_buffer")
    dst = str(tmp_path / "mirror")
    r = cli("cp", tutorial_root, dst)
    assert r.code == 1, r
    assert "step 10: copied" in r.out and "step 20: copied" in r.out
    last = r.err.strip().splitlines()[-1]
    assert "step 30" in last and fname in last and "optim/state/0/momentum_buffer" in last
    assert committed_steps(open_storage(dst)) == [10, 20]


def test_sync_watch_mirrors_a_new_step_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    src_mgr = save_steps(src, {1: 1.0})
    p = subprocess.Popen(
        [sys.executable, "-m", "ckptstore", "sync", src, dst, "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=str(REPO),
    )
    try:
        dst_st = open_storage(dst)

        def wait_for(step: int) -> None:
            deadline = time.monotonic() + 60
            while step not in committed_steps(dst_st):
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, f"step {step} was not mirrored"
                time.sleep(0.1)

        wait_for(1)
        model, opt = train_state(2)
        src_mgr.save(2, {"model": model, "optim": opt}, metrics={"loss": 0.5})  # committed while sync runs
        wait_for(2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, (out, err)
    assert "step 1: copied" in out and "step 2: copied" in out
    assert "stopped; 2 step(s) copied" in err and "Traceback" not in err
    got = CheckpointManager(dst).load(2)
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v)


def test_export_and_import_round_trips(tutorial_root: str, tmp_path: Path, run_main) -> None:
    mgr = CheckpointManager(tutorial_root)
    full = str(tmp_path / "full.pt")
    st_path = str(tmp_path / "full.safetensors")
    r = cli("export", tutorial_root, "20", full)
    assert r.code == 0 and "exported step 20" in r.out, r
    sd = torch.load(full, weights_only=True)
    ref = mgr.load(20)
    assert set(sd) == {"model", "optim", "extra"} and sd["extra"] == {"seen": 200}
    model, opt = train_state(0)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])  # integer state keys and param_groups survived
    assert opt.state_dict()["param_groups"] == ref["optim"]["param_groups"]
    for k, v in ref["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], ref["optim"]["state"][0]["momentum_buffer"])

    # The tutorial's recommended inference file: just the model's state_dict.
    model_pt = str(tmp_path / "model.pt")
    assert run_main("export", tutorial_root, "latest", model_pt, "--select", "model").code == 0
    fresh = TheModelClass()
    fresh.load_state_dict(torch.load(model_pt, weights_only=True))
    for k, v in mgr.load(30)["model"].items():
        assert torch.equal(fresh.state_dict()[k], v)

    doc = run_main("export", tutorial_root, "20", st_path, "--json").json()
    assert doc["format"] == "safetensors" and doc["tensors"] == len(mgr.manifest(20).tensors)
    flat = load_file(st_path)
    assert "model/conv1.weight" in flat and flat["model/conv1.weight"].shape == (6, 3, 5, 5)
    assert set(flat) == set(mgr.manifest(20).tensors)

    r = run_main("export", tutorial_root, "20", full)
    assert r.code == 4 and "already exists" in one_line(r.err)
    r = run_main("export", tutorial_root, "20", str(tmp_path / "x.txt"))
    assert r.code == 2

    # Import the safetensors export elsewhere: the exact nested state, epoch and metrics come back.
    other = str(tmp_path / "other")
    r = cli("import", st_path, other, "--step", "20")
    assert r.code == 0 and "(safetensors)" in r.out, r
    imp = CheckpointManager(other)
    assert imp.info(20).epoch == 2 and imp.info(20).metrics == {"loss": 0.5}
    r = run_main("diff", tutorial_root, "20", "20", "--b-url", other, "--exit-code")
    assert r.code == 0 and "identical" in r.out, r
    # A bare model state_dict .pt, nested under "model", restores into the model.
    doc = run_main("import", model_pt, other, "--step", "5", "--under", "model", "--epoch", "1", "--metric",
                   "loss=0.25", "--json").json()  # fmt: skip
    assert doc["step"] == 5 and doc["epoch"] == 1 and doc["metrics"] == {"loss": 0.25} and doc["format"] == "torch"
    m2 = TheModelClass()
    imp.restore({"model": m2}, step=5)
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in fresh.state_dict().items())
    r = run_main("import", model_pt, other, "--step", "5")
    assert r.code == 4 and "already committed" in one_line(r.err)


def test_import_a_torch_distributed_checkpoint(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model, opt = train_state(7)
    dcp_dir = str(tmp_path / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 4, "seen": [1, 2]},
                 checkpoint_id=dcp_dir)  # fmt: skip
    root = str(tmp_path / "ckpt")
    r = cli("import", dcp_dir, root, "--step", "700", "--epoch", "4", "--metadata", "source=dcp-test")
    assert r.code == 0 and "(dcp)" in r.out, r
    mgr = CheckpointManager(root)
    info = mgr.info(700)
    assert info.epoch == 4 and info.metadata["source"] == "dcp-test" and info.metadata["import_format"] == "dcp"
    state = mgr.load(700)
    assert state["epoch"] == 4 and state["seen"] == [1, 2]
    m2, o2 = train_state(0)
    mgr.restore({"model": m2, "optim": o2}, step=700)
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    s_ref, s_got = opt.state_dict(), o2.state_dict()
    assert s_got["param_groups"] == s_ref["param_groups"] and set(s_got["state"]) == set(s_ref["state"])
    for i, st in s_ref["state"].items():
        assert torch.equal(s_got["state"][i]["momentum_buffer"], st["momentum_buffer"])


def test_diff(tmp_path: Path, tutorial_root: str, run_main) -> None:
    root = str(tmp_path / "d")
    m = CheckpointManager(root)
    m.save(1, {"a": torch.ones(2), "s": torch.ones(2, 2), "d": torch.ones(3), "same": torch.arange(4)})
    m.save(2, {"b": torch.ones(2), "s": torch.ones(3, 2), "d": torch.ones(3, dtype=torch.float64) + 0.5,
               "same": torch.arange(4)})  # fmt: skip
    r = cli("diff", root, "1", "2", "--exit-code")
    doc = run_main("diff", tutorial_root, "10", "20", "--json").json()
    assert doc["identical"] is False and doc["added"] == [] and doc["removed"] == []
    mgr = CheckpointManager(tutorial_root)
    a, b = mgr.load(10), mgr.load(20)
    by_key = {t["key"]: t for t in doc["tensors"]}
    w = "model/conv1.weight"
    expect = float((a["model"]["conv1.weight"].double() - b["model"]["conv1.weight"].double()).abs().max())
    assert by_key[w]["status"] == "changed" and by_key[w]["max_abs_diff"] == pytest.approx(expect)
    assert {"path": "extra/seen", "status": "changed", "a": 100, "b": 200} in doc["values"]
    assert any(i["path"] == "metrics/loss" for i in doc["info"])

    assert r.code == 1, r
    assert "+ b" in r.out and "- a" in r.out and "~ s \t shape torch.Size([2, 2]) -> torch.Size([3, 2])" in r.out
    assert "~ d \t dtype torch.float32 -> torch.float64, max abs diff 0.5" in r.out
    doc = run_main("diff", root, "1", "2", "--json").json()
    assert doc["added"] == ["b"] and doc["removed"] == ["a"]
    st = {t["key"]: (t["status"], t["max_abs_diff"]) for t in doc["tensors"]}
    assert st == {"a": ("removed", None), "s": ("shape", None), "d": ("dtype", 0.5), "same": ("equal", 0.0),
                  "b": ("added", None)}  # fmt: skip


def test_prune_and_gc(tutorial_root: str, run_main) -> None:
    mgr = CheckpointManager(tutorial_root)
    save_steps(tutorial_root, {40: 0.8})
    doc = run_main("prune", tutorial_root, "--keep-last", "1", "--keep-best", "1", "--metric", "loss", "--mode",
                   "min", "--dry-run", "--json").json()  # fmt: skip
    assert doc["dry_run"] and doc["deleted"] == [] and doc["would_delete"] == [10, 30]
    reasons = {d["step"]: d["reasons"] for d in doc["decisions"]}
    assert any("best" in x for x in reasons[20]) and any("newest" in x for x in reasons[40])
    assert mgr.steps() == [10, 20, 30, 40]
    mgr.pin(10)
    r = cli("prune", tutorial_root, "--keep-last", "1", "--keep-best", "1")
    assert r.code == 0, r
    assert "step 30: delete — not kept by any policy" in r.out and "step 10: keep" in r.out and "pinned" in r.out
    assert CheckpointManager(tutorial_root).steps() == [10, 20, 40]
    r = run_main("prune", tutorial_root)
    assert r.code == 2 and "at least one policy" in one_line(r.err)
    # gc: a partial step (no manifest) left by a crashed save.
    partial = Path(mgr.storage.full(step_dir(99)))
    partial.mkdir()
    junk = partial / "shard-dead-r0-0.safetensors"
    junk.write_bytes(b"x" * 10)
    old = time.time() - 7200
    os.utime(junk, (old, old))
    doc = cli("gc", tutorial_root, "--min-age", "60", "--json").json()
    assert doc["removed"] == [f"{step_dir(99)}/shard-dead-r0-0.safetensors"]
    assert not partial.exists() and CheckpointManager(tutorial_root).steps() == [10, 20, 40]


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_cli_never_unpickles_untrusted_data(tmp_path: Path, run_main) -> None:
    sentinel = tmp_path / "pwned"
    root = str(tmp_path / "ckpt")
    CheckpointManager(root).save(1, {"evil": _Evil(str(sentinel)), "w": torch.ones(2)}, allow_pickle=True)
    evil_pt = tmp_path / "evil.pt"
    torch.save({"x": _Evil(str(sentinel))}, evil_pt)
    show, imp = cli_many(["show", root, "1"], ["import", str(evil_pt), str(tmp_path / "other"), "--step", "1"])
    export = run_main("export", root, "1", str(tmp_path / "out.pt"))
    assert show.code == 0 and "evil \t <pickled object" in show.out and "trusted=True" in show.out, show
    assert export.code == 4 and "trusted" in one_line(export.err)
    assert imp.code == 4 and "weights_only" in one_line(imp.err) and "--trusted" in imp.err
    assert run_main("verify", root).code == 0  # checksums only
    assert not sentinel.exists()
