"""Benchmark workloads, built deterministically from a seed inside each measuring process.

* **W1** few large tensors: a module holding ``size_mib / tensor_mib`` fp32 parameters of ``tensor_mib`` MiB each
  (default 64 x 16 MiB = 1 GiB);
* **W2** many small tensors: a module holding ``n_small`` fp32 parameters of ``small_kib`` KiB each
  (default 10,000 x 16 KiB = 156 MiB);
* **W3** a GPT-2-small-like transformer (plain ``nn.Module``s, untied LM head, no downloads) plus AdamW state
  after one optimizer step (~163 M parameters, ~1.95 GB with the optimizer state; ``--quick`` uses a tiny one);
* **W4-DDP**, **W4-FSDP2** a stack of ``dist_mib / tensor_mib`` weights of ``tensor_mib`` MiB (``[rows, 1024]``
  fp32) plus AdamW state, wrapped in ``DistributedDataParallel`` or sharded with FSDP2 ``fully_shard`` on 2 ranks
  for the save, and a plain (unwrapped) copy in one process for the restore (see ``benchmarks/w4_dist.py``);
* **W5** the W1 layout at ``async_mib`` MiB, saved asynchronously inside a training loop
  (see ``benchmarks/w5_async.py``).

Every workload exposes the same state in the shapes each contender wants: modules/optimizers for ckptstore,
``state_dict()``s for ``torch.save``, a flat ``name -> tensor`` dict for safetensors and the raw contender, and a
``Stateful`` wrapper for ``torch.distributed.checkpoint``.

Used by ``benchmarks.worker``; run the suite with ``python -m benchmarks.run``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

MiB = 1 << 20


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    n_ctx: int


GPT_PRESETS: dict[str, GPTConfig] = {
    # GPT-2 small (124 M parameters tied; 163 M here because the LM head is a separate weight).
    "small": GPTConfig(n_layer=12, n_embd=768, n_head=12, vocab=50257, n_ctx=1024),
    "tiny": GPTConfig(n_layer=2, n_embd=128, n_head=4, vocab=4096, n_ctx=128),
}


@dataclass(frozen=True)
class WorkloadSpec:
    """Picklable description of a workload (the measuring subprocess builds it)."""

    name: str
    size_mib: int = 1024
    tensor_mib: int = 16
    n_small: int = 10_000
    small_kib: int = 16
    gpt: str = "small"
    dist_mib: int = 256
    """W4: parameter MiB (the checkpoint is ~3x that with the AdamW state)."""
    async_mib: int = 1024
    """W5: state MiB."""

    def describe(self) -> str:
        if self.name == "W1":
            n = max(1, self.size_mib // self.tensor_mib)
            return f"W1: {n} x {self.tensor_mib} MiB fp32 tensors"
        if self.name == "W2":
            return f"W2: {self.n_small:,} x {self.small_kib} KiB fp32 tensors"
        if self.name in W4_NAMES:
            n = w4_layers(self)
            how = "DDP replicas" if self.name == "W4-DDP" else "FSDP2 shards"
            return (
                f"{self.name}: {n} x {self.tensor_mib} MiB fp32 weights + AdamW state, {how} saved by 2 ranks, "
                "restored by 1"
            )
        if self.name == "W5":
            n = max(1, self.async_mib // self.tensor_mib)
            return f"W5: async save of {n} x {self.tensor_mib} MiB fp32 tensors inside a training loop"
        c = GPT_PRESETS[self.gpt]
        return (
            f"W3: GPT-2-{self.gpt}-like ({c.n_layer} layers, d={c.n_embd}, vocab {c.vocab}, ctx {c.n_ctx}, "
            "untied head) + AdamW state"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- models ---------------------------------------------------------------------------------------------------
class TensorBag(nn.Module):
    """A module whose parameters are ``n`` same-sized fp32 tensors (W1, W2)."""

    def __init__(self, n: int, numel: int, seed: int) -> None:
        super().__init__()
        width = max(1, len(str(n - 1)))
        for i in range(n):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            self.register_parameter(f"p{i:0{width}d}", nn.Parameter(torch.rand(numel, generator=g)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        d = c.n_embd
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})


class GPT(nn.Module):
    """Parameter layout of GPT-2 (no forward pass needed for checkpointing)."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab, c.n_embd)
        self.wpe = nn.Embedding(c.n_ctx, c.n_embd)
        self.h = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab, bias=False)


class LayerStack(nn.Module):
    """W4: ``n`` weights of shape ``[rows, 1024]`` in their own submodules (FSDP2 wraps each layer)."""

    COLS = 1024

    def __init__(self, n: int, rows: int, seed: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(n):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            layer = nn.Module()
            layer.weight = nn.Parameter(torch.rand(rows, self.COLS, generator=g))
            self.layers.append(layer)


W4_NAMES = ("W4-DDP", "W4-FSDP2")


def w4_layers(spec: WorkloadSpec) -> int:
    return max(1, spec.dist_mib // spec.tensor_mib)


def w4_rows(spec: WorkloadSpec) -> int:
    return max(2, spec.tensor_mib * MiB // 4 // LayerStack.COLS)


def adamw_one_step(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with its state created by one step, the parameters serving as their own gradients (no forward)."""
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    # Aliases, not copies: no extra fresh memory; works for plain, DDP and FSDP2 (DTensor) parameters alike.
    for p in model.parameters():
        p.grad = p.detach()
    optim.step()
    for p in model.parameters():
        p.grad = None
    return optim


# -- the workload ---------------------------------------------------------------------------------------------
class Workload:
    """A built workload: ``model`` (and ``optim`` for W3) filled deterministically from ``seed``."""

    def __init__(self, spec: WorkloadSpec, seed: int) -> None:
        self.spec = spec
        self.optim: torch.optim.Optimizer | None = None
        if spec.name == "W1":
            n = max(1, spec.size_mib // spec.tensor_mib)
            self.model: nn.Module = TensorBag(n, spec.tensor_mib * MiB // 4, seed)
        elif spec.name == "W2":
            self.model = TensorBag(spec.n_small, spec.small_kib * 1024 // 4, seed)
        elif spec.name == "W3":
            torch.manual_seed(seed)
            self.model = GPT(GPT_PRESETS[spec.gpt])
            self.optim = adamw_one_step(self.model)
        elif spec.name in W4_NAMES:
            # The single-process (unwrapped) form; benchmarks/w4_dist.py wraps/shards it on 2 ranks.
            self.model = LayerStack(w4_layers(spec), w4_rows(spec), seed)
            self.optim = adamw_one_step(self.model)
        elif spec.name == "W5":
            n = max(1, spec.async_mib // spec.tensor_mib)
            self.model = TensorBag(n, spec.tensor_mib * MiB // 4, seed)
        else:
            raise ValueError(f"unknown workload {spec.name!r} (W1, W2, W3, W4-DDP, W4-FSDP2, W5)")

    # -- flat view (raw, safetensors, fingerprints) ---------------------------------------------------------
    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state under a unique name, in a stable order (no copies)."""
        out = {f"model.{k}": v.detach() for k, v in self.model.state_dict().items()}
        if self.optim is not None:
            for idx, st in self.optim.state_dict()["state"].items():
                for name, v in st.items():
                    if isinstance(v, torch.Tensor):
                        out[f"optim.state.{idx}.{name}"] = v
        return out

    def flat_metadata(self) -> dict[str, str]:
        """Non-tensor state for formats that store tensors only (safetensors)."""
        if self.optim is None:
            return {}
        return {"param_groups": json.dumps(self.optim.state_dict()["param_groups"])}

    def apply_flat(self, flat: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
        """Restore from a flat dict (what a safetensors user writes: load_state_dict on rebuilt dicts)."""
        model_sd = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd)
        if self.optim is not None:
            state: dict[int, dict[str, Any]] = {}
            for k, v in flat.items():
                if k.startswith("optim.state."):
                    idx, name = k[len("optim.state.") :].split(".", 1)
                    state.setdefault(int(idx), {})[name] = v
            groups = json.loads((metadata or {})["param_groups"])
            self.optim.load_state_dict({"state": state, "param_groups": groups})

    # -- torch.save / torch.load ----------------------------------------------------------------------------
    def torch_state(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"model": self.model.state_dict()}
        if self.optim is not None:
            sd["optim"] = self.optim.state_dict()
        return sd

    def apply_torch_state(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        if self.optim is not None:
            self.optim.load_state_dict(sd["optim"])

    # -- ckptstore -----------------------------------------------------------------------------------------
    def ckpt_state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"model": self.model}
        if self.optim is not None:
            st["optim"] = self.optim
        return st

    # -- torch.distributed.checkpoint -------------------------------------------------------------------------
    def dcp_app(self) -> Any:
        """The ``Stateful`` wrapper of the DCP tutorial (get_state_dict / set_state_dict)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        wl = self

        class AppState:
            def state_dict(self) -> dict[str, Any]:
                if wl.optim is None:
                    return {"model": get_model_state_dict(wl.model)}
                m, o = get_state_dict(wl.model, wl.optim)
                return {"model": m, "optim": o}

            def load_state_dict(self, sd: dict[str, Any]) -> None:
                if wl.optim is None:
                    set_model_state_dict(wl.model, sd["model"])
                else:
                    set_state_dict(wl.model, wl.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

        return AppState()


def tensor_nbytes(spec: WorkloadSpec) -> int:
    """Checkpoint payload bytes (all tensors) of a workload, without building it."""
    if spec.name == "W1":
        return max(1, spec.size_mib // spec.tensor_mib) * spec.tensor_mib * MiB
    if spec.name == "W2":
        return spec.n_small * spec.small_kib * 1024
    if spec.name in W4_NAMES:
        n = w4_layers(spec)
        return 3 * n * w4_rows(spec) * LayerStack.COLS * 4 + 4 * n  # weights, exp_avg, exp_avg_sq; fp32 steps
    if spec.name == "W5":
        return max(1, spec.async_mib // spec.tensor_mib) * spec.tensor_mib * MiB
    c = GPT_PRESETS[spec.gpt]
    d = c.n_embd
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    params = c.vocab * d + c.n_ctx * d + c.n_layer * per_block + 2 * d + d * c.vocab
    n_tensors = 2 + c.n_layer * 12 + 2 + 1
    return 3 * 4 * params + 4 * n_tensors  # params + exp_avg + exp_avg_sq, plus one fp32 step per param


def tensor_count(spec: WorkloadSpec) -> int:
    if spec.name == "W1":
        return max(1, spec.size_mib // spec.tensor_mib)
    if spec.name == "W2":
        return spec.n_small
    if spec.name in W4_NAMES:
        return 4 * w4_layers(spec)
    if spec.name == "W5":
        return max(1, spec.async_mib // spec.tensor_mib)
    c = GPT_PRESETS[spec.gpt]
    return 4 * (2 + c.n_layer * 12 + 2 + 1)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


__all__ = [
    "GPT_PRESETS",
    "W4_NAMES",
    "LayerStack",
    "MiB",
    "Workload",
    "WorkloadSpec",
    "adamw_one_step",
    "human_bytes",
    "tensor_count",
    "tensor_nbytes",
    "w4_layers",
    "w4_rows",
]
