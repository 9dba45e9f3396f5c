"""Elastic resume over real processes: a run preempted at 2 ranks resumes at 3, then at 1 (and across an epoch
boundary), and every sample of every epoch is consumed exactly once.

Each leg is a real launch (``run_ranks``: fresh interpreters, gloo, DDP) with a ``CheckpointManager`` on a
shared directory and a DataLoader with a worker process that prefetches ahead of training. The ranks append
every id they train on to a file; the test then counts them. The per-rank bodies are in
``tests/distributed/_elastic_workers.py``.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager
from tests.distributed import _elastic_workers as EW
from tests.fixtures.dist import run_ranks, values

pytestmark = pytest.mark.distributed

SEED = 3


def lockstep(n: int, start: int, world: int, batch: int) -> bool:
    """Every rank of a pass over ``n - start`` samples takes the same number of steps (the workers do not use
    ``join()``, so a config that breaks this would hang in DDP rather than test anything)."""
    q, rem = divmod(n - start, world)
    return rem == 0 or q % batch != 0


def perm(n: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def run_legs(tmp_path: Path, n: int, batch: int, epochs: int, legs: list[tuple[int, int | None]]) -> list[Any]:
    root, ids = tmp_path / "ckpt", tmp_path / "ids"
    ids.mkdir()
    outs = []
    for i, (world, stop) in enumerate(legs):
        cfg = {
            "root": str(root),
            "ids_dir": str(ids),
            "leg": i,
            "n": n,
            "batch": batch,
            "epochs": epochs,
            "seed": SEED,
            "stop_step": stop,
            "num_workers": 1,
        }
        outs.append(values(run_ranks(EW.elastic_leg, world, cfg, timeout=150)))
    return outs


def read_ids(tmp_path: Path) -> dict[str, list[tuple[int, int]]]:
    """file name -> [(epoch, id)] in the order the rank consumed them."""
    out = {}
    for f in sorted((tmp_path / "ids").glob("*.txt")):
        out[f.stem] = [(int(e), int(i)) for e, i in (line.split() for line in f.read_text().splitlines())]
    return out


def check_saves(root: Path, outs: list[Any], expected: list[tuple[int, int]]) -> None:
    """At every save all ranks held the same sampler state, it is the expected global cursor, and it is what
    the manager stored (once, replicated)."""
    cursors = []
    with CheckpointManager(str(root)) as mgr:
        for leg in outs:
            (save,) = leg[0]["saves"]
            for rank_out in leg:
                assert rank_out["saves"][0]["every_rank"] == [save["state"]] * len(leg), rank_out["saves"]
            assert mgr.load(save["step"])["data"] == save["state"]
            cursors.append((save["state"]["epoch"], save["state"]["consumed"]))
    assert cursors == expected


def check_restores(outs: list[Any]) -> None:
    for prev, leg in itertools.pairwise(outs):
        saved = prev[0]["saves"][0]
        for rank_out in leg:
            assert rank_out["restored"] == {"step": saved["step"], "state": saved["state"]}


@pytest.mark.timeout(600)
def test_preempted_at_2_resumed_at_3_then_1_each_sample_once(tmp_path: Path) -> None:
    n, batch = 103, 4
    assert lockstep(n, 0, 2, batch) and lockstep(n, 48, 3, batch) and lockstep(n, 84, 1, batch)
    outs = run_legs(tmp_path, n, batch, 1, [(2, 6), (3, 9), (1, None)])
    assert [len(leg) for leg in outs] == [2, 3, 1]
    check_saves(tmp_path / "ckpt", outs, [(0, 48), (0, 84), (0, 103)])
    check_restores(outs)

    # The loader ran ahead of training when the job was preempted; the cursor counts what was trained on.
    first = outs[0][0]["saves"][0]
    assert first["consumed_this_pass"] == 6 * batch
    assert first["yielded"] > first["consumed_this_pass"], first

    files = read_ids(tmp_path)
    everything = [i for rows in files.values() for e, i in rows if e == 0]
    counts = Counter(everything)
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, counts.most_common(3)
    # Each leg consumed the next stretch of the one global order an uninterrupted run would use.
    p = perm(n, 0)
    for leg, (lo, hi), world in zip(range(3), [(0, 48), (48, 84), (84, 103)], [2, 3, 1]):
        got = sorted(i for r in range(world) for _, i in files[f"leg{leg}-rank{r}"])
        assert got == sorted(p[lo:hi]), leg
    # ... partitioned over the world size of that leg: rank r of W starts at position lo + r.
    assert files["leg1-rank2"][0] == (0, p[48 + 2])


@pytest.mark.timeout(600)
def test_elastic_resume_across_an_epoch_boundary(tmp_path: Path) -> None:
    n, batch = 51, 4
    # leg 0: W=2 from 0, preempted after 5 steps (40 samples); leg 1: W=3 takes the last 11 (one step) and is
    # preempted right at the end of epoch 0; leg 2: W=2 starts epoch 1, preempted after 3 steps; leg 3: W=3
    # finishes epoch 1.
    assert all(lockstep(n, s, w, batch) for s, w in [(0, 2), (40, 3), (0, 2), (24, 3)])
    outs = run_legs(tmp_path, n, batch, 2, [(2, 5), (3, 6), (2, 9), (3, None)])
    check_saves(tmp_path / "ckpt", outs, [(0, 40), (0, 51), (1, 24), (1, 51)])
    check_restores(outs)

    files = read_ids(tmp_path)
    for epoch in (0, 1):
        seen = [i for rows in files.values() for e, i in rows if e == epoch]
        counts = Counter(seen)
        assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, (epoch, counts.most_common(3))
    # The job restored at the end of epoch 0 trained on no sample of epoch 0 again.
    assert {e for r in range(2) for e, _ in files[f"leg2-rank{r}"]} == {1}
    # Epoch 1 used its own permutation, continued across the 2 -> 3 resume.
    assert sorted(i for r in range(2) for _, i in files[f"leg2-rank{r}"]) == sorted(perm(n, 1)[:24])


@pytest.mark.timeout(400)
def test_example_script(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "elastic_train.py"
    proc = subprocess.run(
        [sys.executable, str(example), "--root", str(tmp_path / "ck"), "--worlds", "2,3"],
        capture_output=True,
        text=True,
        timeout=380,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "[job 1] 3 ranks, resume at step 6: epoch 0, cursor 48" in out, out[-4000:]
    assert "each of 103 ids exactly once in each of 1 epoch(s): True" in out, out[-4000:]
