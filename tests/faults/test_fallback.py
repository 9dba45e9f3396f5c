"""restore("latest") falling back from a step that fails verification leaves no trace of the failed attempt."""

from __future__ import annotations

import pytest
import torch

from ckptstore.errors import StateMismatchError
from ckptstore.format.manifest import step_dir
from tests.faults.conftest import Backend
from tests.faults.forge import flip_bit

pytestmark = pytest.mark.faults


def _corrupt(backend: Backend, mgr, step: int, key: str) -> None:
    p = mgr.manifest(step).tensors[key].pieces[0]
    rel = f"{step_dir(step)}/{p.file}"
    backend.write(rel, flip_bit(backend.read(rel), p.start + 3))


def test_fallback_that_would_mix_steps_is_refused(backend: Backend) -> None:
    mgr = backend.manager()
    mgr.save(1, {"a": torch.full((256,), 1.0)})
    mgr.save(2, {"a": torch.full((256,), 2.0), "c": torch.full((256,), 2.0)})
    _corrupt(backend, mgr, 2, "a")
    target = {"a": torch.zeros(256), "c": torch.full((256,), -1.0)}
    # Step 2 fails its checksum after its bytes landed in the targets; step 1 has no "c", so falling back would
    # leave step 2's (unverified) values in "c" next to step 1's "a".
    with pytest.raises(StateMismatchError, match="mix two steps") as ei:
        backend.manager().restore(target, strict=False)
    assert "'c'" in str(ei.value) or "c" in ei.value.missing


def test_fallback_that_sets_everything_again_is_bit_exact(backend: Backend) -> None:
    mgr = backend.manager()
    mgr.save(1, {"a": torch.full((256,), 1.0), "c": torch.full((256,), 1.0)})
    mgr.save(2, {"a": torch.full((256,), 2.0), "c": torch.full((256,), 2.0)})
    _corrupt(backend, mgr, 2, "c")
    target = {"a": torch.zeros(256), "c": torch.zeros(256)}
    info = backend.manager().restore(target)
    assert info.step == 1
    assert torch.equal(target["a"], torch.full((256,), 1.0)) and torch.equal(target["c"], torch.full((256,), 1.0))


def test_fallback_into_a_module_sets_every_parameter_again(backend: Backend) -> None:
    torch.manual_seed(0)
    m1 = torch.nn.Linear(8, 4)
    mgr = backend.manager()
    mgr.save(1, {"model": m1})
    m2 = torch.nn.Linear(8, 4)
    mgr.save(2, {"model": m2})
    _corrupt(backend, mgr, 2, "model/weight")
    fresh = torch.nn.Linear(8, 4)
    assert backend.manager().restore({"model": fresh}).step == 1
    assert torch.equal(fresh.weight, m1.weight) and torch.equal(fresh.bias, m1.bias)
