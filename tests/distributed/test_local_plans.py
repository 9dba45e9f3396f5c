"""Per-rank write plans (issue #16): when every rank's boxes are DDP replicas or even Shard(0) parts, each rank
plans its own files — no gather of boxes, no plan broadcast, no planning at all when the structure is the
previous save's — and anything else falls back to the gathered plan (real gloo processes, real files)."""

from __future__ import annotations

import pytest

from tests.distributed import _plan_workers as W
from tests.fixtures.dist import run_ranks, values

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

LAYERS = 40


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def outs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp(f"plans{request.param}")
    return values(run_ranks(W.local_plans, request.param, str(root), LAYERS, timeout=220))


def _whats(save: dict) -> list[str]:
    return [what for _, what, _ in save["collectives"]]


def test_every_step_restores_bit_exactly(outs: list[dict]) -> None:
    assert all(o["exact"] == [True] * 4 for o in outs), [o["exact"] for o in outs]


def test_regular_saves_gather_no_boxes_and_broadcast_no_plan(outs: list[dict]) -> None:
    for o in outs:
        for save in o["saves"][:3]:
            whats = _whats(save)
            assert not any("write plan" in w for w in whats), whats
            assert len(whats) == 4, whats  # start (gather + broadcast), commit (gather + broadcast)
            # Before the write, what a rank sends does not grow with the state (80+ tensors here): ~100 bytes.
            start = [n for kind, what, n in save["collectives"] if "start of the save" in what]
            assert max(start) < 600, save["collectives"]


def test_same_structure_skips_planning_and_a_change_plans_again(outs: list[dict]) -> None:
    for o in outs:
        assert [s["planned"] for s in o["saves"][:3]] == [1, 0, 1]


def test_an_irregular_sharding_falls_back_to_the_gathered_plan(outs: list[dict]) -> None:
    for o in outs:
        last = o["saves"][3]
        assert last["planned"] == 0
        assert any("write plan" in w for w in _whats(last)), _whats(last)


def test_compact_rows_come_from_the_ranks_lines(outs: list[dict]) -> None:
    # Each rank sent its files of Shard(0) parts as layout lines; rank 0 never fell back to explicit pieces.
    for o in outs:
        assert [s["expanded"] for s in o["saves"]] == [0, 0, 0, 0]
        assert o["layout"] and o["chunk_rows"] == LAYERS
