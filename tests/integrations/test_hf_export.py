"""``ckptstore.hf.export_hf``: steps saved by CheckpointManager become directories that transformers'
``from_pretrained`` loads, with the same outputs (real GPT-2 / LLaMA / BERT models built from small configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ckptstore import CheckpointManager, IOOptions
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    UnsafeCheckpointError,
)
from ckptstore.format.manifest import step_dir

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.integrations, pytest.mark.timeout(300)]

VOCAB = 96


def gpt2() -> Any:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def llama() -> Any:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def bert() -> Any:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0)  # fmt: skip
    return transformers.BertForMaskedLM(cfg)


MODELS = {"gpt2": (gpt2, "AutoModelForCausalLM"), "llama": (llama, "AutoModelForCausalLM"),
          "bert": (bert, "AutoModelForMaskedLM")}  # fmt: skip

TOKENS = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def trained(kind: str, seed: int = 0) -> tuple[Any, torch.optim.Optimizer]:
    """A model after one AdamW step (so its weights differ from any fresh initialisation)."""
    torch.manual_seed(seed)
    model = MODELS[kind][0]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(input_ids=TOKENS, labels=TOKENS)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return model.eval(), opt


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def from_pretrained(kind: str, path: Path, **kw: Any) -> Any:
    return getattr(transformers, MODELS[kind][1]).from_pretrained(str(path), **kw).eval()


def config_dir(model: Any, tmp: Path) -> Path:
    d = tmp / "base"
    model.config.save_pretrained(str(d))
    return d


def st_keys(out: Path) -> dict[str, str]:
    """tensor name -> safetensors dtype tag, over every weights file of an export."""
    found: dict[str, str] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                assert k not in found
                found[k] = str(h.get_slice(k).get_dtype())
    return found


@pytest.mark.parametrize("kind", list(MODELS))
def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path: Path, kind: str) -> None:
    from ckptstore.hf import export_hf

    model, opt = trained(kind)
    # Tiny chunks: every tensor over 1 KiB is stored as several pieces that the export reassembles.
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=1024))
    mgr.save(10, {"model": model, "optim": opt, "step": 10})
    m = mgr.manifest(10)
    assert max(len(e.pieces) for e in m.tensors.values()) > 4
    res = export_hf(mgr, "latest", tmp_path / "out", copy_from=config_dir(model, tmp_path))
    out = tmp_path / "out"
    assert res.step == 10 and res.files == ["model.safetensors"] and res.copied == ["config.json"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # one file: no index, as transformers
    want = {k: v for k, v in model.state_dict().items()}
    assert set(st_keys(out)) == set(want)
    loaded = from_pretrained(kind, out)
    assert torch.equal(logits(loaded), logits(model))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    # No temporary directory is left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ck", "out"]


def test_sharded_output_has_the_transformers_index(tmp_path: Path) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("llama")
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=2048))
    mgr.save(1, {"model": model})
    limit = 20_000
    res = export_hf(mgr, 1, tmp_path / "out", max_shard_bytes=limit, copy_from=config_dir(model, tmp_path))
    out = tmp_path / "out"
    n = len(res.files) - 1
    assert n > 3 and res.files[-1] == "model.safetensors.index.json"
    shards = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert res.files[:-1] == shards
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors.index.json", *shards])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index) == ["metadata", "weight_map"]
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values()) == res.nbytes
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in sd.values())
    assert set(index["weight_map"]) == set(sd) and list(index["weight_map"]) == sorted(sd)
    for f in shards:
        with safe_open(str(out / f), framework="pt") as h:
            names = list(h.keys())
            assert all(index["weight_map"][k] == f for k in names)
            size = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in names)
            assert size <= limit or len(names) == 1
    loaded = from_pretrained("llama", out)
    assert torch.equal(logits(loaded), logits(model))


class DDPLike(torch.nn.Module):
    """What DistributedDataParallel's state_dict looks like: the model under ``module.``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["compile", "ddp", "ddp+compile", "plain_state_dict"])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, wrap: str) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("gpt2", seed=1)
    if wrap == "compile":
        state: Any = {"model": torch.compile(model)}
        prefix = "_orig_mod."
    elif wrap == "ddp":
        state = {"model": DDPLike(model)}
        prefix = "module."
    elif wrap == "ddp+compile":
        state = {"model": torch.compile(DDPLike(model))}
        prefix = "_orig_mod.module."
    else:
        state = model.state_dict()  # a bare state_dict saved as the step itself
        prefix = ""
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(3, state)
    keys = list(mgr.manifest(3).tensors)
    assert all(k.startswith(("model/" if prefix or wrap != "plain_state_dict" else "") + prefix) for k in keys)
    export_hf(mgr, 3, tmp_path / "out", copy_from=config_dir(model, tmp_path))
    assert set(st_keys(tmp_path / "out")) == set(model.state_dict())
    assert torch.equal(logits(from_pretrained("gpt2", tmp_path / "out")), logits(model))


def test_dtype_cast(tmp_path: Path) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("llama", seed=2)
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=1024))
    mgr.save(1, {"model": model})
    res = export_hf(mgr, 1, tmp_path / "out", dtype="bf16", copy_from=config_dir(model, tmp_path))
    sd = model.state_dict()
    assert res.nbytes == sum(t.numel() * 2 for t in sd.values())
    assert set(st_keys(tmp_path / "out").values()) == {"BF16"}
    loaded = from_pretrained("llama", tmp_path / "out", dtype=torch.bfloat16)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, sd[k].to(torch.bfloat16)), k
    # Same weights; non-persistent buffers (rotary inv_freq) may differ in precision between the two paths.
    ref = logits(model.to(torch.bfloat16)).float()
    assert torch.allclose(logits(loaded).float(), ref, atol=3e-2, rtol=3e-2)


def test_key_map_regex_and_callable(tmp_path: Path) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("gpt2", seed=3)
    # The training code kept the model as "backbone" with its own names: rename them to transformers' names.
    state = {"net": {k.replace("transformer.", "backbone."): v for k, v in model.state_dict().items()}}
    state["net"]["ema_decay"] = torch.tensor(0.99)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, state)
    base = config_dir(model, tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no 'model'"):
        export_hf(mgr, 1, tmp_path / "nope", copy_from=base)
    res = export_hf(mgr, 1, tmp_path / "out", select="net", copy_from=base,
                    key_map=[(r"^backbone\.", "transformer."), (r"^ema_decay$", "")])  # fmt: skip
    assert res.dropped == ["ema_decay"] and res.tensors == len(model.state_dict())
    assert torch.equal(logits(from_pretrained("gpt2", tmp_path / "out")), logits(model))
    res = export_hf(mgr, 1, tmp_path / "out2", select="net", copy_from=base,
                    key_map=lambda k: None if k == "ema_decay" else k.replace("backbone.", "transformer."))  # fmt: skip
    assert torch.equal(logits(from_pretrained("gpt2", tmp_path / "out2")), logits(model))
    with pytest.raises(ConfigError, match="both map to"):
        export_hf(mgr, 1, tmp_path / "out3", select="net", key_map=[(r"\.(weight|bias)$", ".w")])
    with pytest.raises(ConfigError, match="invalid"):
        export_hf(mgr, 1, tmp_path / "out3", select="net", key_map=[("(", "x")])
    assert not (tmp_path / "out3").exists()


def _flip(mgr: CheckpointManager, step: int, key: str) -> None:
    piece = mgr.manifest(step).tensors[key].pieces[-1]
    path = mgr.storage.full(f"{step_dir(step)}/{piece.file}")
    with open(path, "r+b") as f:
        f.seek(piece.start + 3)
        b = f.read(1)
        f.seek(piece.start + 3)
        f.write(bytes([b[0] ^ 0x01]))


def test_corrupt_piece_is_an_integrity_error_and_leaves_no_output(tmp_path: Path) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("gpt2", seed=4)
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=1024))
    mgr.save(1, {"model": model})
    _flip(mgr, 1, "model/transformer.h.1.mlp.c_fc.weight")  # a chunked tensor's last piece, late in the export
    with pytest.raises(IntegrityError, match="checksum mismatch") as ei:
        export_hf(mgr, 1, tmp_path / "out", max_shard_bytes=8000)
    assert ei.value.key == "model/transformer.h.1.mlp.c_fc.weight"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # neither out/ nor a temporary directory


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("gpt2", seed=5)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, {"model": model})
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine (mkdir -p out && export)
    export_hf(mgr, 1, out, max_shard_bytes=30_000)
    before = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in before
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        export_hf(mgr, 1, out)
    assert sorted(os.listdir(out)) == before
    res = export_hf(mgr, 1, out, overwrite=True)  # replaced as a whole: no stale shards of the old export
    assert sorted(os.listdir(out)) == ["model.safetensors"] == res.files
    (out / "sub").mkdir()
    with pytest.raises(CheckpointExistsError, match="subdirectories"):
        export_hf(mgr, 1, out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointExistsError, match="not a directory"):
        export_hf(mgr, 1, tmp_path / "file", overwrite=True)
    os.symlink(out, tmp_path / "link")
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        export_hf(mgr, 1, tmp_path / "link", overwrite=True)


def test_copy_from_copies_regular_files_only(tmp_path: Path) -> None:
    from ckptstore.hf import export_hf

    model, _ = trained("gpt2", seed=6)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, {"model": model})
    base = config_dir(model, tmp_path)
    model.generation_config.save_pretrained(str(base))
    (base / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    (base / "model.safetensors").write_bytes(b"not copied: the export writes its own weights")
    (base / "notes.txt").write_text("not in the list")
    res = export_hf(mgr, 1, tmp_path / "out", copy_from=base)
    assert res.copied == ["config.json", "generation_config.json", "tokenizer_config.json"]
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 32}'
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*res.copied, "model.safetensors"])
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    os.symlink(secret, base / "tokenizer.json")
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        export_hf(mgr, 1, tmp_path / "out2", copy_from=base)
    assert not (tmp_path / "out2").exists()
    os.unlink(base / "tokenizer.json")
    os.mkfifo(base / "vocab.json")  # would block a plain open()/read()
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        export_hf(mgr, 1, tmp_path / "out2", copy_from=base)
    with pytest.raises(ConfigError, match="plain file name"):
        export_hf(mgr, 1, tmp_path / "out2", copy_from=base, copy_files=["../secret.txt"])
    with pytest.raises(ConfigError, match="weights file"):
        export_hf(mgr, 1, tmp_path / "out2", copy_from=base, copy_files=["model.safetensors"])
    assert not (tmp_path / "out2").exists()


def test_weights_stored_once_are_exported_once(tmp_path: Path) -> None:
    """A step whose manifest maps two keys to the same stored bytes (a tied lm_head saved once, as ckptstore
    does for shared storage) exports the shared tensor once, under the first name, as save_pretrained does; and
    from_pretrained re-ties it."""
    from ckptstore.hf import export_hf
    from tests.faults.forge import sign

    model, _ = trained("gpt2", seed=7)
    assert model.lm_head.weight is model.transformer.wte.weight
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=1024))
    mgr.save(1, {"model": model})
    path = Path(mgr.storage.full(f"{step_dir(1)}/manifest.json"))
    doc = json.loads(path.read_bytes())
    doc["tensors"]["model/lm_head.weight"] = doc["tensors"]["model/transformer.wte.weight"]
    path.write_bytes(sign(doc))
    mgr2 = CheckpointManager(str(tmp_path / "ck"))
    res = export_hf(mgr2, 1, tmp_path / "out", copy_from=config_dir(model, tmp_path))
    assert res.tied == {"lm_head.weight": "transformer.wte.weight"}
    keys = st_keys(tmp_path / "out")
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    loaded = from_pretrained("gpt2", tmp_path / "out")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(logits(loaded), logits(model))


_RSS_CHILD = r"""
import sys, torch
from ckptstore import CheckpointManager
from ckptstore.hf import export_hf

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

mgr = CheckpointManager(sys.argv[1])
mgr.manifest(1)
torch.ones(4).to(torch.bfloat16)  # allocator and cast kernels (their code pages count in RSS) set up first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
res = export_hf(mgr, 1, sys.argv[2], max_shard_bytes=int(sys.argv[3]), dtype=sys.argv[4] or None,
                read_batch_bytes=int(sys.argv[5]))
print(status("VmHWM") - base, res.nbytes, len(res.files))
"""


def _export_rss(root: Path, out: Path, shard: int, dtype: str | None, batch: int) -> tuple[int, int, int]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(root), str(out), str(shard), dtype or "", str(batch)],
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert p.returncode == 0, p.stderr
    grew, nbytes, files = map(int, p.stdout.split())
    return grew, nbytes, files


@pytest.mark.parametrize("chunk", [1 << 20, 1 << 30], ids=["chunked", "one-piece"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_tensors_larger_than_a_read_batch_are_streamed(tmp_path: Path, chunk: int, dtype: str | None) -> None:
    """A 48 MiB tensor (alone in its output file) exported with 8 MiB read batches: peak RSS grows by about one
    batch, not by the tensor — whether it is stored as 1 MiB chunks or as one piece, cast or not."""
    big = torch.randn(3 << 20, 4)  # 48 MiB
    state = {"model": {"embed.weight": big, "norm.weight": torch.ones(4)}}
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=chunk))
    mgr.save(1, state)
    assert (len(mgr.manifest(1).tensors["model/embed.weight"].pieces) > 1) == (chunk < big.nbytes)
    mgr.close()
    grew, nbytes, files = _export_rss(tmp_path / "ck", tmp_path / "out", 16 << 20, dtype, 8 << 20)
    assert nbytes == (48 << 20) // (2 if dtype else 1) + 16 // (2 if dtype else 1) and files == 3
    # 8 MiB batch + 4 MiB cast buffer + slack, far below the tensor
    assert grew < 20 << 20, f"peak RSS grew by {grew / 2**20:.1f} MiB with 8 MiB read batches"
    with safe_open(str(tmp_path / "out" / "model-00001-of-00002.safetensors"), framework="pt") as h:
        want = big.to(torch.bfloat16) if dtype else big
        assert torch.equal(h.get_tensor("embed.weight"), want)


def test_export_memory_stays_near_one_shard(tmp_path: Path) -> None:
    """Peak RSS of an export (fresh process) grows by about one output shard (measured: 18 MiB for 16 MiB shards
    of a 128 MiB model), not by the model."""
    shard = 16 << 20
    state = {"model": {f"layer{i}.weight": torch.randn(512, 1024) for i in range(64)}}  # 64 x 2 MiB = 128 MiB
    mgr = CheckpointManager(str(tmp_path / "ck"), io=IOOptions(chunk_bytes=1 << 20))
    mgr.save(1, state)
    mgr.close()
    grew, nbytes, files = _export_rss(tmp_path / "ck", tmp_path / "out", shard, None, 64 << 20)
    assert nbytes == 128 << 20 and files == 9
    assert grew < 1.5 * shard, f"peak RSS grew by {grew / 2**20:.1f} MiB for {shard >> 20} MiB shards"
    with safe_open(str(tmp_path / "out" / "model-00008-of-00008.safetensors"), framework="pt") as h:
        for k in h.keys():
            assert torch.equal(h.get_tensor(k), state["model"][k])


def test_export_from_a_non_local_root(tmp_path: Path) -> None:
    """Any storage backend: the pieces are read through the storage layer (here memory://), not as local files."""
    from ckptstore.hf import export_hf

    model, _ = trained("gpt2", seed=8)
    mgr = CheckpointManager("memory://hf-export-test", io=IOOptions(chunk_bytes=1024))
    mgr.save(2, {"model": model})
    res = export_hf(mgr, 2, tmp_path / "out", copy_from=config_dir(model, tmp_path))
    assert res.tensors == len(model.state_dict())
    assert torch.equal(logits(from_pretrained("gpt2", tmp_path / "out")), logits(model))


def test_names_sizes_and_dtypes_parse_as_documented() -> None:
    from ckptstore.hf import parse_dtype, parse_rename, parse_size, strip_wrappers

    assert strip_wrappers("module._orig_mod.transformer.h.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert strip_wrappers("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert strip_wrappers("layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.w") == "layers.0.mlp.w"
    assert strip_wrappers("encoder.module.weight") == "encoder.module.weight"  # a submodule named "module" stays
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64MiB") == 64 << 20 and parse_size(1000) == 1000
    assert parse_size("1.5 kB") == 1500
    for bad in ("", "lots", "-1MB", "0", 0):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("int8")
    assert parse_rename(r"^a=b=c") == ("^a=b", "c") and parse_rename("x=") == ("x", "")
    with pytest.raises(ConfigError):
        parse_rename("=x")


@pytest.mark.s3
def test_export_from_s3(tmp_path: Path, s3_root: tuple[str, dict[str, Any]]) -> None:
    """A step on S3 (real moto server over HTTP): the export reads the pieces with ranged GETs."""
    from ckptstore.hf import export_hf

    url, opts = s3_root
    model, _ = trained("llama", seed=9)
    mgr = CheckpointManager(url, storage_options=opts, io=IOOptions(chunk_bytes=4096))
    mgr.save(4, {"model": model})
    mgr.close()
    res = export_hf(url, "latest", tmp_path / "out", storage_options=opts, max_shard_bytes=40_000,
                    copy_from=config_dir(model, tmp_path))  # fmt: skip
    assert res.step == 4 and len(res.files) > 2
    assert torch.equal(logits(from_pretrained("llama", tmp_path / "out")), logits(model))


def test_streamed_tensor_checks_its_pieces(tmp_path: Path) -> None:
    """The streaming path (a tensor larger than the read batch) checks each piece's crc32c over its ranges and
    reports a missing data file as an IntegrityError; nothing is left behind either way."""
    from ckptstore.hf import export_hf

    w = torch.randn(256, 1024)  # 1 MiB, one piece, exported with 64 KiB read batches
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, {"model": {"w": w}})
    res = export_hf(mgr, 1, tmp_path / "ok", read_batch_bytes=64 << 10)
    with safe_open(str(tmp_path / "ok" / res.files[0]), framework="pt") as h:
        assert torch.equal(h.get_tensor("w"), w)
    _flip(mgr, 1, "model/w")
    with pytest.raises(IntegrityError, match="checksum mismatch") as ei:
        export_hf(mgr, 1, tmp_path / "out", read_batch_bytes=64 << 10)
    assert ei.value.key == "model/w"
    piece = mgr.manifest(1).tensors["model/w"].pieces[0]
    os.unlink(mgr.storage.full(f"{step_dir(1)}/{piece.file}"))
    with pytest.raises(IntegrityError, match="missing"):
        export_hf(mgr, 1, tmp_path / "out", read_batch_bytes=64 << 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ok"]
