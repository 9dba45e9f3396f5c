"""restore()/load() behave like ``load_state_dict`` / ``torch.load`` where users rely on it (issue #17, items 3-4).

Each test names what happened before: modules with their own loading logic (``LazyLinear``, quantization observers,
QAT-prepared models) failed; ``requires_grad`` targets in plain containers raised a raw autograd error after other
targets were overwritten; a model on the meta device stayed empty while restore reported success; an unavailable
``map_location`` silently loaded to CPU; a meta tensor in the saved state raised a raw ``NotImplementedError``;
tied weights were written once per key and came back untied from ``load()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ckptstore import CheckpointManager
from ckptstore.errors import StateMismatchError, UnsupportedValueError


@pytest.fixture
def mgr(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(str(tmp_path / "ck"))


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- modules with their own loading logic -------------------------------------------------------------------------
def test_lazy_modules_are_materialised_like_load_state_dict(mgr: CheckpointManager) -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    src(torch.randn(3, 5))
    mgr.save(1, {"model": src})
    dst = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    mgr.restore({"model": dst})  # before: StateMismatchError (shape [] in the state)
    _same_state(src, dst)
    x = torch.randn(2, 5)
    assert torch.equal(src(x), dst(x))


def test_quantization_observers_load_their_own_way(mgr: CheckpointManager) -> None:
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    src = nn.ModuleDict({"pc": PerChannelMinMaxObserver(ch_axis=0), "mm": MinMaxObserver()})
    src["pc"](torch.randn(6, 4))
    src["mm"](torch.randn(10))
    mgr.save(1, {"obs": src})
    dst = nn.ModuleDict({"pc": PerChannelMinMaxObserver(ch_axis=0), "mm": MinMaxObserver()})
    mgr.restore({"obs": dst})  # before: StateMismatchError, min_val has shape [0] in a fresh observer
    _same_state(src, dst)
    assert torch.equal(src["pc"].calculate_qparams()[0], dst["pc"].calculate_qparams()[0])


def test_qat_prepared_model_round_trips(mgr: CheckpointManager) -> None:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    def build() -> nn.Module:
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).train()
        m.qconfig = get_default_qat_qconfig("fbgemm")
        return prepare_qat(m)

    src = build()
    for _ in range(3):
        src(torch.randn(16, 8)).sum().backward()
    mgr.save(1, {"model": src})
    dst = build()
    mgr.restore({"model": dst})
    _same_state(src, dst)
    x = torch.randn(4, 8)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_a_load_state_dict_pre_hook_is_honoured(mgr: CheckpointManager) -> None:
    """A migration hook (old checkpoints kept the weight flat): the hook sees the checkpoint's tensor, not the
    model's. Before: StateMismatchError (shape [3, 3] in the state, [9] in the checkpoint)."""
    src = nn.Linear(3, 3)
    mgr.save(1, {"model": {"weight": src.weight.detach().flatten(), "bias": src.bias.detach()}})
    dst = nn.Linear(3, 3)
    seen: list[list[str]] = []

    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:  # public signature
        seen.append(sorted(state_dict))
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"].view(3, 3)

    dst.register_load_state_dict_pre_hook(hook)
    mgr.restore({"model": dst})
    assert seen == [["bias", "weight"]]
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)


def test_plain_parameters_keep_the_in_place_fast_path(mgr: CheckpointManager) -> None:
    src = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(2))
    src(torch.randn(1, 4))
    mgr.save(1, {"model": src})
    dst = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(2))
    before = dst[0].weight.data_ptr()
    mgr.restore({"model": dst})
    assert dst[0].weight.data_ptr() == before  # read straight into the existing parameter
    _same_state(src, dst)


# -- requires_grad targets, meta models, devices ------------------------------------------------------------------
def test_requires_grad_targets_needing_a_copy_are_restored(mgr: CheckpointManager) -> None:
    mgr.save(1, {"a": torch.arange(4, dtype=torch.float64), "b": torch.arange(16.0).view(4, 4), "c": torch.ones(2)})
    a = torch.zeros(4, requires_grad=True)  # float32 target of a float64 value: needs a copy
    b = torch.zeros(4, 4).t().requires_grad_()  # non-contiguous leaf
    c = torch.zeros(2, requires_grad=True)
    state = {"a": a, "b": b, "c": c}
    mgr.restore(state, strict=True)  # before: raw RuntimeError (leaf variable ... in-place), after c was written
    assert state["a"] is a and torch.equal(a.detach(), torch.arange(4.0)) and a.requires_grad
    assert torch.equal(b.detach(), torch.arange(16.0).view(4, 4)) and b.requires_grad
    assert torch.equal(c.detach(), torch.ones(2))


def test_a_model_on_the_meta_device_gets_real_tensors(mgr: CheckpointManager) -> None:
    src = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    src(torch.randn(5, 3))
    mgr.save(1, {"model": src})
    with torch.device("meta"):
        dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    mgr.restore({"model": dst})  # before: success reported, every tensor still on meta
    assert all(not t.is_meta for t in dst.state_dict().values())
    assert isinstance(dst[0].weight, nn.Parameter) and dst[0].weight.requires_grad
    _same_state(src, dst)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_an_unavailable_map_location_raises_like_torch_load(mgr: CheckpointManager) -> None:
    mgr.save(1, {"w": torch.ones(3)})
    for ml in ("cuda", torch.device("cuda:0"), {"cpu": "cuda"}, lambda key, t: "cuda"):
        with pytest.raises(UnsupportedValueError, match="not available"):
            mgr.load(1, map_location=ml)  # before: loaded to CPU with a warning
    for ml in ("cuda", torch.device("cuda:0"), {"cpu": "cuda"}):  # a callable is asked per fresh tensor only
        target = torch.zeros(3)
        with pytest.raises(UnsupportedValueError, match="not available"):
            mgr.restore({"w": target}, map_location=ml)
        assert torch.equal(target, torch.zeros(3))
    assert torch.equal(mgr.load(1, map_location="cpu")["w"], torch.ones(3))


def test_a_meta_tensor_in_the_state_is_refused_clearly(mgr: CheckpointManager) -> None:
    with pytest.raises(UnsupportedValueError, match="meta device"):  # before: raw NotImplementedError
        mgr.save(1, {"w": torch.empty(3, device="meta")})
    assert mgr.steps() == []


# -- shared storage ------------------------------------------------------------------------------------------------
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.wte.weight  # GPT-2 style weight tying


def test_tied_weights_are_written_once_and_tied_again_on_load(mgr: CheckpointManager) -> None:
    src = _Tied()
    mgr.save(1, {"model": src})
    m = mgr.manifest(1)
    assert m.nbytes == 50 * 16 * 4  # before: twice
    out = mgr.load(1)["model"]
    assert out["wte.weight"] is out["head.weight"]  # torch.load re-ties storage shared at save time
    dst = _Tied()
    mgr.restore({"model": dst})
    assert dst.head.weight is dst.wte.weight and torch.equal(dst.wte.weight, src.wte.weight)


def test_the_same_tensor_under_three_keys_is_one_copy(mgr: CheckpointManager) -> None:
    t = torch.randn(1000)
    mgr.save(1, {"a": t, "b": t, "c": {"d": t}, "e": t.clone()})
    assert mgr.manifest(1).nbytes == 2 * 1000 * 4  # before: 4 copies
    out = mgr.load(1)
    assert out["a"] is out["b"] is out["c"]["d"] and out["e"] is not out["a"]
    assert torch.equal(out["e"], t) and torch.equal(out["a"], t)
    state = {"a": torch.zeros(1000), "b": torch.zeros(1000), "c": {"d": torch.zeros(1000)}, "e": torch.zeros(1000)}
    mgr.restore(state)
    assert all(torch.equal(v, t) for v in (state["a"], state["b"], state["c"]["d"], state["e"]))


def test_a_mismatch_is_still_refused_before_anything_changes(mgr: CheckpointManager) -> None:
    src = nn.Sequential(nn.LazyLinear(4))
    src(torch.randn(1, 3))
    mgr.save(1, {"model": src, "extra": torch.ones(2)})
    dst = nn.Sequential(nn.Linear(5, 4))  # a plain module of another shape: still a plan-time refusal
    extra = torch.zeros(2)
    with pytest.raises(StateMismatchError):
        mgr.restore({"model": dst, "extra": extra})
    assert torch.equal(extra, torch.zeros(2))
