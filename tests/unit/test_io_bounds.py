"""The I/O layer sizes every byte view from the tensor's real storage, never from ``numel * element_size``."""

from __future__ import annotations

import pytest
import torch

from ckptstore.errors import UnsupportedValueError
from ckptstore.io import tensor_bytes


@pytest.mark.parametrize("dtype", [torch.quint4x2, torch.quint2x4])
def test_sub_byte_dtypes_get_no_view_longer_than_their_storage(dtype: torch.dtype) -> None:
    t = torch.empty(64, dtype=dtype)
    assert t.untyped_storage().nbytes() < t.numel() * t.element_size()  # the trap: storage is smaller
    with pytest.raises(UnsupportedValueError, match="storage holds"):
        tensor_bytes(t)


def test_views_are_exactly_the_tensor_bytes() -> None:
    base = torch.arange(16, dtype=torch.float32)
    assert tensor_bytes(base).nbytes == 64
    assert tensor_bytes(base[4:]).nbytes == 48
    assert tensor_bytes(torch.zeros(3, dtype=torch.bfloat16)).nbytes == 6
    assert tensor_bytes(torch.zeros(0)).nbytes == 0
