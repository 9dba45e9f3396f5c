"""Hostile entries in a local checkpoint root (issue 14, items 5 and 10), through the manager.

- a ``step-…`` symbolic link to another directory: ``gc`` must not delete that directory's files, retention must
  not delete a ``manifest.json`` through it (before: both did);
- the newest step's ``manifest.json`` is a FIFO, a symbolic link to ``/dev/zero``, or a directory: every storage
  read refuses it at once with ``NotRegularFileError`` (before: a FIFO blocked forever, /dev/zero read until
  memory ran out), and ``restore("latest")`` / ``steps()`` never hang or exhaust memory (child process under
  RLIMIT_AS and SIGALRM, see ``_special_child.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptstore import CheckpointManager
from ckptstore.format.manifest import step_dir
from ckptstore.storage.base import NotRegularFileError
from tests.faults.conftest import assert_state, make_state

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
SPECIAL_CHILD = Path(__file__).with_name("_special_child.py")


def tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_gc_never_deletes_through_a_symlinked_step(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root))
    mgr.save(1, make_state(1))
    other = tmp_path / "precious"
    (other / "sub").mkdir(parents=True)
    for name in ("weights.bin", "shard-abc-0.safetensors", "sub/notes.txt"):
        (other / name).write_bytes(b"do not delete " + name.encode())
    before = tree(other)
    (root / step_dir(7)).symlink_to(other, target_is_directory=True)
    try:
        removed = mgr.gc(min_age_seconds=0)
    except OSError as e:
        # Refusing loudly is acceptable (the link stays); following it is not.
        assert isinstance(e, NotRegularFileError) and step_dir(7) in str(e), repr(e)
        removed = []
    assert tree(other) == before, f"gc deleted files outside the root through {step_dir(7)}: removed {removed}"
    assert not [r for r in removed if r.startswith(step_dir(7) + "/")], removed
    assert mgr.steps() == [1]
    assert_state(mgr.load(1), make_state(1))


def test_retention_never_deletes_a_manifest_through_a_symlinked_step(tmp_path: Path) -> None:
    # Another root's committed step 3, linked into this root as step 3.
    other_root = tmp_path / "other"
    other = CheckpointManager(str(other_root))
    other.save(3, make_state(3))
    before = tree(other_root)
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), retention={"keep_last": 1})
    mgr.save(1, make_state(1))
    mgr.save(2, make_state(2))
    (root / step_dir(3)).symlink_to(other_root / step_dir(3), target_is_directory=True)
    mgr.save(4, make_state(4))
    assert tree(other_root) == before, "retention deleted files of another root through a symlinked step"
    assert_state(CheckpointManager(str(other_root)).load(3), make_state(3))
    assert mgr.steps() == [4]  # a link is not a step of this root
    target = make_state(0)
    assert mgr.restore(target, step="latest").step == 4
    assert_state(target, make_state(4))


def test_special_manifest_never_hangs_or_exhausts_memory(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    p = subprocess.run(
        [sys.executable, str(SPECIAL_CHILD), str(root)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert rows and rows[-1] == {"done": True}, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    rows = rows[:-1]
    print("\n" + "\n".join(f"{r['case']:>18} | {r['call']:<16} | {r['outcome']:<22} | {r['seconds']} s" for r in rows))
    by = {(r["case"], r["call"]): r for r in rows}
    assert len(by) == 3 * 7
    for (_case, call), r in by.items():
        assert r["seconds"] < 5, r
        if call in ("read_bytes", "read_bytes range", "read_into", "map_private", "size"):
            assert r["outcome"] == "NotRegularFileError", r
        elif call == "restore latest":
            # Falls back to step 1 once the manifest reader maps NotRegularFileError to ManifestError (the
            # lead's change); until then the typed OSError. Never a hang, never MemoryError.
            assert r["outcome"] in ("ok 1", "StorageError(NotRegularFileError)", "ManifestError"), r
        else:  # steps(): listing never opens the manifest
            assert r["outcome"].startswith("ok ["), r
