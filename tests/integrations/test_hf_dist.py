"""HF layout with FSDP2 (DTensor) models on real gloo ranks: a sharded save exported for ``from_pretrained``, and a
``save_pretrained`` directory loaded into a sharded model where each rank reads only its own byte ranges.

The per-rank bodies are module-level functions of this module (``run_ranks`` pickles them by reference)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.dist import assert_bit_equal, run_ranks, values

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.integrations, pytest.mark.distributed, pytest.mark.timeout(400)]

TOKENS = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _llama(seed: int) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _shard(model: Any, world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_state(model: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in full.items()}


def fsdp_save(rank: int, world: int, root: str) -> dict[str, Any] | None:
    """Train a sharded LLaMA one step, save it with ckptstore (tiny chunks), return the full state from rank 0."""
    from ckptstore import CheckpointManager, IOOptions

    model = _shard(_llama(seed=0), world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    opt.step()
    mgr = CheckpointManager(root, io=IOOptions(chunk_bytes=512, timeout_seconds=60))
    mgr.save(5, {"model": model, "optim": opt})
    mgr.close()
    full = _full_state(model)
    return full if rank == 0 else None


def fsdp_load(rank: int, world: int, hf_dir: str) -> dict[str, Any]:
    """Load an HF directory into a freshly initialised sharded LLaMA, counting the bytes this rank reads."""
    from torch.distributed.tensor import DTensor

    from ckptstore import hf

    model = _shard(_llama(seed=100 + rank), world)
    counted = [0]
    real = os.preadv

    def counting(fd: int, buffers: Any, offset: int, *a: Any) -> int:
        n = real(fd, buffers, offset, *a)
        counted[0] += n
        return n

    os.preadv = counting  # count every byte read through the OS (os.preadv / os.pread)
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        b = real_pread(fd, n, offset)
        counted[0] += len(b)
        return b

    os.pread = counting_pread
    try:
        res = hf.load_hf_into(model, hf_dir)
    finally:
        os.preadv, os.pread = real, real_pread
    local = sum(v.to_local().numel() * v.element_size() for v in model.state_dict().values() if isinstance(v, DTensor))
    with torch.no_grad():
        out = model(input_ids=TOKENS).logits
    full = _full_state(model)
    return {"counted": counted[0], "bytes_read": res.bytes_read, "local": local, "loaded": len(res.loaded),
            "full": full if rank == 0 else None, "logits": out if rank == 0 else None}  # fmt: skip


def test_fsdp2_sharded_save_exports_for_from_pretrained(tmp_path: Path) -> None:
    from ckptstore import CheckpointManager
    from ckptstore.hf import export_hf

    root = str(tmp_path / "ck")
    full = values(run_ranks(fsdp_save, 2, root, timeout=300))[0]
    m = CheckpointManager(root).manifest(5)
    e = m.tensors["model/model.layers.0.mlp.up_proj.weight"]
    assert len(e.pieces) > 2 and {p.offsets[0] for p in e.pieces if p.offsets} > {0}  # boxes of both ranks
    _llama(0).config.save_pretrained(str(tmp_path / "base"))
    res = export_hf(root, "latest", tmp_path / "out", copy_from=tmp_path / "base", max_shard_bytes=30_000)
    assert len(res.files) > 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert_bit_equal(dict(loaded.state_dict()), {k: full[k] for k in loaded.state_dict()})
    plain = _llama(1)
    plain.load_state_dict(full)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=TOKENS).logits, plain.eval()(input_ids=TOKENS).logits)


def _header_bytes(d: Path) -> int:
    """Bytes of the index and of every file's header (what each rank reads besides tensor data)."""
    n = (d / "model.safetensors.index.json").stat().st_size
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as h:
            n += 8 + struct.unpack("<Q", h.read(8))[0]
    return n


def test_hf_dir_loads_into_fsdp2_model_reading_only_each_ranks_shards(tmp_path: Path) -> None:
    src = _llama(seed=7)
    opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    src(input_ids=TOKENS, labels=TOKENS).loss.backward()
    opt.step()
    src.eval()
    hf_dir = tmp_path / "hf"
    src.save_pretrained(str(hf_dir), max_shard_size="30KB")
    assert (hf_dir / "model.safetensors.index.json").exists()
    outs = values(run_ranks(fsdp_load, 2, str(hf_dir), timeout=300))
    want = {k: v for k, v in src.state_dict().items()}
    assert_bit_equal(outs[0]["full"], {k: want[k] for k in outs[0]["full"]})
    with torch.no_grad():
        assert torch.allclose(outs[0]["logits"], src(input_ids=TOKENS).logits, atol=1e-6, rtol=1e-5)
    total = sum(v.numel() * v.element_size() for v in want.values())
    headers = _header_bytes(hf_dir)
    for r, o in enumerate(outs):
        assert o["loaded"] == len(want)
        # What the loader says it read is what went through the OS calls; beyond the headers (read by every
        # rank), exactly this rank's shard bytes.
        assert o["counted"] == o["bytes_read"], r
        assert o["bytes_read"] - headers == o["local"], (r, o["bytes_read"], headers, o["local"])
        assert o["local"] < 0.6 * total
    assert sum(o["local"] for o in outs) == total
