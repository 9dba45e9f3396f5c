"""Result types never raise on values a manifest can hold."""

from __future__ import annotations

import math

from ckptstore.types import CheckpointInfo


def test_metric_of_a_huge_int_does_not_overflow() -> None:
    info = CheckpointInfo(step=1, metrics={"big": 10**400, "neg": -(10**400), "ok": 3, "s": "x", "b": True})
    assert info.metric("big") == math.inf and info.metric("neg") == -math.inf
    assert info.metric("ok") == 3.0 and info.metric("s") is None and info.metric("b") is None
    assert info.metric("missing") is None


def test_out_of_range_step_and_epoch_are_refused_before_any_byte_is_written(tmp_path) -> None:
    import pytest
    import torch

    from ckptstore import CheckpointManager
    from ckptstore.errors import UnsupportedValueError

    mgr = CheckpointManager(str(tmp_path / "ck"))
    with pytest.raises(UnsupportedValueError, match="step must be"):
        mgr.save(2**63, {"w": torch.ones(2)})
    with pytest.raises(UnsupportedValueError, match="epoch must be"):
        mgr.save(1, {"w": torch.ones(2)}, epoch=2**70)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_an_empty_root_is_refused() -> None:
    import pytest

    from ckptstore import CheckpointManager
    from ckptstore.errors import ConfigError

    for root in ("", "  "):
        with pytest.raises(ConfigError, match="non-empty"):
            CheckpointManager(root)
