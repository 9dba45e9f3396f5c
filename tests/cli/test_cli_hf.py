"""``ckptstore export URL STEP OUT --format hf`` run as a subprocess; the output loads with transformers'
``from_pretrained`` and gives the model's logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptstore import CheckpointManager, IOOptions
from ckptstore.format.manifest import step_dir

from .conftest import cli, one_line

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.cli, pytest.mark.integrations, pytest.mark.timeout(300)]

TOKENS = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    opt.step()
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def test_export_format_hf(tmp_path: Path) -> None:
    model = _gpt2()
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root, io=IOOptions(chunk_bytes=1024))
    # As a torch.compile'd model saved with its training state; the names carry _orig_mod.
    mgr.save(7, {"model": torch.compile(model), "step": 7})
    mgr.close()
    model.config.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "hf"
    r = cli("export", root, "latest", str(out), "--format", "hf", "--max-shard-size", "40KB",
            "--copy-from", str(tmp_path / "base"), "--json")  # fmt: skip
    assert r.code == 0, r
    doc = r.json()
    assert doc["format"] == "hf" and doc["step"] == 7 and doc["copied"] == ["config.json"]
    assert doc["files"][-1] == "model.safetensors.index.json" and len(doc["files"]) > 3
    assert sorted(os.listdir(out)) == sorted(["config.json", *doc["files"]])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(_logits(loaded), _logits(model))
    # Exists: refused (exit 4, --force named), then replaced with --force; --dtype and --rename.
    r = cli("export", root, "7", str(out), "--format", "hf")
    assert r.code == 4 and "--force" in one_line(r.err) and "overwrite=True" not in r.err, r
    r = cli("export", root, "7", str(out), "--format", "hf", "--force", "--dtype", "bf16",
            "--rename", r"^transformer\.=backbone.", "--rename", r"^lm_head\.weight$=")  # fmt: skip
    assert r.code == 0, r
    assert "exported step 7" in r.out and "Hugging Face" in r.out
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        keys = set(h.keys())
        assert {str(h.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert "lm_head.weight" not in keys and "backbone.wte.weight" in keys and not any("_orig_mod" in k for k in keys)
    assert sorted(os.listdir(out)) == ["model.safetensors"]


def test_export_format_hf_errors(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    mgr.save(1, {"model": torch.nn.Linear(4, 4).state_dict()})
    piece = mgr.manifest(1).tensors["model/weight"].pieces[0]
    mgr.close()
    r = cli("export", root, "1", str(tmp_path / "x.pt"), "--dtype", "bf16")
    assert r.code == 2 and "only apply to --format hf" in one_line(r.err), r
    r = cli("export", root, "1", str(tmp_path / "dir"))
    assert r.code == 2 and "--format hf" in one_line(r.err), r
    r = cli("export", root, "1", str(tmp_path / "x.pt"), "--format", "safetensors")
    assert r.code == 2 and "does not match" in one_line(r.err), r
    r = cli("export", root, "1", str(tmp_path / "o"), "--format", "hf", "--rename", "noequals")
    assert r.code == 2 and "REGEX=REPLACEMENT" in one_line(r.err), r
    r = cli("export", root, "1", str(tmp_path / "o"), "--format", "hf", "--max-shard-size", "lots")
    assert r.code == 2 and "invalid size" in one_line(r.err), r
    r = cli("export", root, "1", str(tmp_path / "o"), "--format", "hf", "--select", "nope")
    assert r.code == 3 and "no 'nope'" in one_line(r.err), r
    path = tmp_path / "ck" / step_dir(1) / piece.file
    data = bytearray(path.read_bytes())
    data[piece.start] ^= 0xFF
    path.write_bytes(bytes(data))
    r = cli("export", root, "1", str(tmp_path / "o"), "--format", "hf")
    assert r.code == 1 and "checksum mismatch" in one_line(r.err), r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
