"""Fixtures of the framework tests. Frameworks change torch's process-wide settings (Lightning's
``Trainer(deterministic=True)`` turns on ``torch.use_deterministic_algorithms``, which makes every later
``torch.empty`` fill its memory): each test module gives them back as they were, so no other module runs under
them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")  # module: before the modules' own module-scoped training runs
def _restore_torch_globals() -> Iterator[None]:
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)
