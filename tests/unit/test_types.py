"""Result types never raise on values a manifest can hold."""

from __future__ import annotations

import math

from ckptstore.types import CheckpointInfo


def test_metric_of_a_huge_int_does_not_overflow() -> None:
    info = CheckpointInfo(step=1, metrics={"big": 10**400, "neg": -(10**400), "ok": 3, "s": "x", "b": True})
    assert info.metric("big") == math.inf and info.metric("neg") == -math.inf
    assert info.metric("ok") == 3.0 and info.metric("s") is None and info.metric("b") is None
    assert info.metric("missing") is None
