"""Every ```python block of README.md runs, in order, as one session (later blocks use earlier blocks' names).

What a snippet takes for granted (``model``, ``optimizer``, ``step``, a dataset, ...) comes from ``_PRELUDE``: the
seed tutorial's CNN with SGD, as a reader of the tutorial has them. A block may be preceded by a hidden
``<!-- snippet-setup ... -->`` comment (code run first, e.g. a step number) and followed by a hidden
``<!-- snippet-check ... -->`` comment (assertions on what the block did). The S3 block's example endpoint
``http://127.0.0.1:9000`` is replaced by the moto server's, with its bucket created. Blocks in other languages
(shell, YAML, output listings) are not run.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE_ENDPOINT = "http://127.0.0.1:9000"

_PRELUDE = """
from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from ckptstore import CheckpointManager, Pickled

class TheModelClass(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

torch.manual_seed(0)
model = TheModelClass()
optimizer = opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
x = torch.randn(4, 3, 32, 32)
dataset = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
step, epoch, epochs, loss = 1200, 3, 1, 0.25
start, total = 0, 3

def train_step(*batch):
    inputs = batch[0] if batch else x
    optimizer.zero_grad()
    model(inputs).sum().backward()
    optimizer.step()
"""


@dataclass
class Snippet:
    line: int
    code: str
    setup: str = ""
    check: str = ""


def _comment(lines: list[str], i: int, tag: str) -> tuple[str, int]:
    """The body of a ``<!-- tag ... -->`` comment starting at line ``i`` (and the line after it), else ``("", i)``."""
    if i >= len(lines) or not lines[i].strip().startswith(f"<!-- {tag}"):
        return "", i
    body: list[str] = []
    first = lines[i].strip()[len(f"<!-- {tag}") :]
    j = i
    while True:
        text = first if j == i else lines[j]
        if "-->" in text:
            body.append(text.split("-->")[0])
            return textwrap.dedent("\n".join(body)).strip() + "\n", j + 1
        body.append(text)
        j += 1


def snippets(text: str) -> list[Snippet]:
    lines = text.splitlines()
    out: list[Snippet] = []
    setup = ""
    i = 0
    while i < len(lines):
        found, nxt = _comment(lines, i, "snippet-setup")
        if found:
            setup, i = found, nxt
            continue
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            snip = Snippet(line=start + 1, code="\n".join(lines[start:end]) + "\n", setup=setup)
            setup = ""
            j = end + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            snip.check, after = _comment(lines, j, "snippet-check")
            out.append(snip)
            i = after if snip.check else end + 1
            continue
        if lines[i].strip():
            setup = ""  # a setup comment belongs to the block right after it
        i += 1
    return out


def test_the_readme_has_snippets_and_the_parser_finds_them() -> None:
    found = snippets(README.read_text())
    assert len(found) >= 7
    assert all(s.code.strip() for s in found)
    assert any(s.check for s in found)


def test_parser_attaches_setup_and_check_to_their_block() -> None:
    text = "x\n<!-- snippet-setup\na = 1\n-->\n```python\nb = a\n```\n\n<!-- snippet-check assert b == 1 -->\n"
    (s,) = snippets(text)
    assert (s.setup, s.code, s.check) == ("a = 1\n", "b = a\n", "assert b == 1\n")


def test_every_readme_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any) -> None:
    monkeypatch.chdir(tmp_path)
    # A real module, so that the tutorial's whole-model pickle can find its class again.
    (tmp_path / "readme_prelude.py").write_text(_PRELUDE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "readme_prelude", raising=False)
    ns: dict[str, Any] = dict(vars(importlib.import_module("readme_prelude")))
    for s in snippets(README.read_text()):
        code = s.code
        if EXAMPLE_ENDPOINT in code:
            endpoint = request.getfixturevalue("s3_reset")
            request.getfixturevalue("s3_client").create_bucket(Bucket=re.search(r"s3://([^/\"]+)", code)[1])
            code = code.replace(EXAMPLE_ENDPOINT, endpoint)
        for part, what in ((s.setup, "setup"), (code, "snippet"), (s.check, "check")):
            if not part:
                continue
            try:
                exec(compile(part, f"README.md:{s.line} ({what})", "exec"), ns)
            except Exception as e:
                pytest.fail(f"README.md line {s.line} ({what}) failed: {type(e).__name__}: {e}\n{part}")
    for value in list(ns.values()):
        if isinstance(value, ns["CheckpointManager"]):
            value.close()
