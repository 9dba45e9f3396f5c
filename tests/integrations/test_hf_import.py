"""``ckptstore.hf.load_hf_into``: start training from a ``save_pretrained`` directory (real transformers models
from small configs), tied weights without ``strict=False``, hostile safetensors headers refused with typed errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptstore.errors import (
    CheckpointNotFoundError,
    ManifestError,
    StateMismatchError,
    UnsafeCheckpointError,
)
from tests.integrations.test_hf_export import MODELS, logits, trained

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.integrations, pytest.mark.timeout(300)]


def fresh(kind: str, seed: int = 123) -> Any:
    torch.manual_seed(seed)
    return MODELS[kind][0]().eval()


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "index"])
def test_load_save_pretrained_dir_into_a_fresh_model(tmp_path: Path, kind: str, sharded: bool) -> None:
    from ckptstore.hf import load_hf_into

    model, _ = trained(kind, seed=11)
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="20KB" if sharded else "5GB")
    names = os.listdir(tmp_path / "hf")
    assert ("model.safetensors.index.json" in names) == sharded
    target = fresh(kind)
    assert not torch.equal(logits(target), logits(model))
    res = load_hf_into(target, tmp_path / "hf")
    assert torch.equal(logits(target), logits(model))
    for k, v in target.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert res.missing == [] and res.unexpected == []
    if kind == "gpt2":  # save_pretrained dropped the tied lm_head; strict still passes
        assert res.tied == {"lm_head.weight": "transformer.wte.weight"}
        assert target.lm_head.weight is target.transformer.wte.weight
    if kind == "bert":
        assert "cls.predictions.decoder.weight" in res.tied
    if kind == "llama":  # untied: both written, both loaded
        assert res.tied == {} and "lm_head.weight" in res.loaded
    data = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    data -= sum(model.state_dict()[k].numel() * model.state_dict()[k].element_size() for k in res.tied)
    assert data < res.bytes_read < data + (64 << 10)  # the data once, plus headers


def test_load_into_wrapped_models_and_base_model_dirs(tmp_path: Path) -> None:
    from ckptstore.hf import load_hf_into

    model, _ = trained("gpt2", seed=12)
    model.save_pretrained(str(tmp_path / "hf"))
    compiled = torch.compile(fresh("gpt2"))  # keys start with _orig_mod.
    load_hf_into(compiled, tmp_path / "hf")
    assert torch.equal(logits(compiled._orig_mod), logits(model))
    # A GPT2Model directory (keys without "transformer.") into GPT2LMHeadModel, as from_pretrained allows.
    model.transformer.save_pretrained(str(tmp_path / "base"))
    assert not any(k.startswith("transformer.") for k in load_file(str(tmp_path / "base" / "model.safetensors")))
    target = fresh("gpt2")
    res = load_hf_into(target, tmp_path / "base")
    assert res.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert torch.equal(logits(target), logits(model))


def test_dtype_is_cast_to_the_model_and_key_map(tmp_path: Path) -> None:
    from ckptstore.hf import load_hf_into

    model, _ = trained("llama", seed=13)
    sd = {("net." + k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "hf").mkdir()
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    target = fresh("llama")
    with pytest.raises(StateMismatchError, match="missing") as ei:
        load_hf_into(target, tmp_path / "hf")
    assert "model.embed_tokens.weight" in ei.value.missing and "net.lm_head.weight" in ei.value.unexpected
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for k, v in target.state_dict().items():  # nothing changed by the refused load
        assert torch.equal(v, before[k])
    load_hf_into(target, tmp_path / "hf", key_map=[(r"^net\.", "")])
    for k, v in target.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, model.state_dict()[k].to(torch.bfloat16).float()), k


def test_missing_unexpected_and_shape_mismatch(tmp_path: Path) -> None:
    from ckptstore.hf import load_hf_into

    model, _ = trained("llama", seed=14)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "a").mkdir()
    dropped = dict(sd)
    del dropped["model.layers.1.mlp.up_proj.weight"]
    dropped["extra.weight"] = torch.zeros(3)
    save_file(dropped, str(tmp_path / "a" / "model.safetensors"), metadata={"format": "pt"})
    target = fresh("llama")
    with pytest.raises(StateMismatchError) as ei:
        load_hf_into(target, tmp_path / "a")
    assert ei.value.missing == ["model.layers.1.mlp.up_proj.weight"] and ei.value.unexpected == ["extra.weight"]
    res = load_hf_into(target, tmp_path / "a", strict=False)
    assert res.missing == ["model.layers.1.mlp.up_proj.weight"] and res.unexpected == ["extra.weight"]
    assert torch.equal(target.model.embed_tokens.weight, model.model.embed_tokens.weight)
    (tmp_path / "b").mkdir()
    bad = dict(sd)
    bad["lm_head.weight"] = torch.zeros(5, 32)
    save_file(bad, str(tmp_path / "b" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StateMismatchError, match="shape"):
        load_hf_into(fresh("llama"), tmp_path / "b", strict=False)


# -- hostile directories ---------------------------------------------------------------------------------------
def _st_file(path: Path, header: dict[str, Any], data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 4))


@pytest.mark.parametrize(
    "header, match",
    [
        ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1 << 40]}}, "outside the file"),
        ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [-64, 0]}}, "outside the file"),
        ({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 64]}}, "does not match"),
        ({"w": {"dtype": "Q4_K", "shape": [4, 4], "data_offsets": [0, 64]}}, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, "does not match"),
        ({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
          "v": {"dtype": "F32", "shape": [2, 4], "data_offsets": [16, 48]}}, "overlaps"),
        ({"w": "not an object"}, "not an object"),
    ],
)  # fmt: skip
def test_forged_headers_are_manifest_errors(tmp_path: Path, header: dict[str, Any], match: str) -> None:
    from ckptstore.hf import load_hf_into

    (tmp_path / "hf").mkdir()
    _st_file(tmp_path / "hf" / "model.safetensors", header, bytes(64))
    m = Tiny()
    with pytest.raises(ManifestError, match=match):
        load_hf_into(m, tmp_path / "hf")
    assert torch.equal(m.w, torch.zeros(4, 4))


def test_forged_header_length_and_index(tmp_path: Path) -> None:
    from ckptstore.hf import load_hf_into

    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(ManifestError, match="header length"):
        load_hf_into(Tiny(), d)
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ManifestError, match="shorter"):
        load_hf_into(Tiny(), d)
    os.unlink(d / "model.safetensors")
    with pytest.raises(CheckpointNotFoundError):
        load_hf_into(Tiny(), d)
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "outside.safetensors"))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(UnsafeCheckpointError, match="not a file next to the index"):
        load_hf_into(Tiny(), d)
    index.write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError):
        load_hf_into(Tiny(), d)
    save_file({"v": torch.ones(4, 4)}, str(d / "model-00001-of-00001.safetensors"))
    with pytest.raises(ManifestError, match="index places"):
        load_hf_into(Tiny(), d)
    index.write_text('{"weight_map": [1, 2]}')
    with pytest.raises(ManifestError, match="weight_map"):
        load_hf_into(Tiny(), d)
    index.write_text("[" * 100_000)
    with pytest.raises(ManifestError, match="not a safetensors index"):
        load_hf_into(Tiny(), d)
    os.unlink(index)
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(ManifestError, match="not a regular file"):
        load_hf_into(Tiny(), d)


def test_box_reads_only_their_bytes(tmp_path: Path) -> None:
    """The ranged reader used for sharded models: a column box of a 2-D tensor and a row box read exactly the
    box's bytes."""
    from ckptstore.hf import open_hf

    full = torch.arange(12 * 10, dtype=torch.float32).reshape(12, 10)
    save_file({"w": full, "e": torch.arange(4 * 3 * 5, dtype=torch.int64).reshape(4, 3, 5)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    ck = open_hf(tmp_path)
    start = ck.bytes_read
    out = torch.empty(12, 3)
    ck.read_box("w", (0, 4), (12, 3), out)
    assert torch.equal(out, full[:, 4:7]) and ck.bytes_read - start == 12 * 3 * 4
    rows = torch.empty(5, 10)
    ck.read_box("w", (7, 0), (5, 10), rows)
    assert torch.equal(rows, full[7:12])
    e = torch.arange(4 * 3 * 5, dtype=torch.int64).reshape(4, 3, 5)
    box = torch.empty(2, 2, 5, dtype=torch.int64)
    ck.read_box("e", (1, 1, 0), (2, 2, 5), box)
    assert torch.equal(box, e[1:3, 1:3, :])


def test_ties_come_from_the_model_not_from_guesses(tmp_path: Path) -> None:
    from ckptstore.hf import load_hf_into

    # Untied LLaMA (tie_word_embeddings=False): a directory without lm_head.weight is missing a key, never filled
    # from the embedding, although the class lists lm_head -> embed_tokens as a possible tie.
    model, _ = trained("llama", seed=15)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "a").mkdir()
    save_file(sd, str(tmp_path / "a" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StateMismatchError) as ei:
        load_hf_into(fresh("llama"), tmp_path / "a")
    assert ei.value.missing == ["lm_head.weight"]
    # GPT-2 declares the tie in its config; a model whose tie was broken (a separate lm_head tensor) still gets
    # lm_head from the embedding, as from_pretrained would.
    src, _ = trained("gpt2", seed=16)
    src.save_pretrained(str(tmp_path / "g"))
    target = fresh("gpt2")
    target.lm_head.weight = torch.nn.Parameter(torch.zeros_like(target.lm_head.weight))
    res = load_hf_into(target, tmp_path / "g")
    assert res.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert target.lm_head.weight is not target.transformer.wte.weight
    assert torch.equal(target.lm_head.weight, src.transformer.wte.weight)
    assert torch.equal(logits(target), logits(src))


def test_transformers_allowances_and_file_order(tmp_path: Path) -> None:
    """Keys the model class says to ignore (GPT-2 hub checkpoints carry old ``attn.bias`` mask buffers) do not
    break a strict load; a directory with both files is read from ``model.safetensors``, as transformers does."""
    from ckptstore.hf import load_hf_into

    src, _ = trained("gpt2", seed=17)
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    d = tmp_path / "hub-like"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"x": "elsewhere.safetensors"}}')
    target = fresh("gpt2")
    res = load_hf_into(target, d)
    assert res.unexpected == [] and res.path.endswith("model.safetensors")
    assert torch.equal(logits(target), logits(src))
    sd["transformer.h.0.attn.weird"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StateMismatchError) as ei:
        load_hf_into(fresh("gpt2"), d)
    assert ei.value.unexpected == ["transformer.h.0.attn.weird"]
