"""Helpers for the CLI tests: run ``python -m ckptstore`` as a subprocess, build small checkpoints in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from ckptstore import CheckpointManager
from ckptstore.cli import main

REPO = Path(__file__).resolve().parents[2]


class TheModelClass(nn.Module):
    """The seed tutorial's model (conv1.weight is torch.Size([6, 3, 5, 5]))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("CKPTSTORE_STORAGE_OPTIONS", None)
    env.pop("CKPTSTORE_FORCE_TERMINAL", None)
    env.update(extra or {})
    return env


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m ckptstore ARGS`` (stdout/stderr are pipes, so output is plain text)."""
    p = subprocess.run(
        [sys.executable, "-m", "ckptstore", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        cwd=str(REPO),
    )
    return Result(p.returncode, p.stdout, p.stderr)


def cli_many(*arglists: Sequence[str], timeout: float = 120) -> list[Result]:
    """Run several independent CLI invocations concurrently (torch start-up dominates each one)."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(ex.map(lambda a: cli(*a, timeout=timeout), arglists))


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """``ckptstore.cli.main`` in this process (same code as the subprocess, for extra variants of a command)."""

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            code = main(list(args))
        finally:
            for k in env or {}:
                monkeypatch.delenv(k, raising=False)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def one_line(err: str) -> str:
    """The single stderr line of an error (asserts there is exactly one)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def train_state(seed: int) -> tuple[TheModelClass, optim.SGD]:
    torch.manual_seed(seed)
    model = TheModelClass()
    opt = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    opt.step()
    return model, opt


def save_steps(root: str, steps: dict[int, float], *, storage_options: dict | None = None) -> CheckpointManager:
    """Save the tutorial model + optimizer as ``{step: loss}`` (epoch = step // 10)."""
    mgr = CheckpointManager(root, storage_options=storage_options)
    for step, loss in steps.items():
        model, opt = train_state(step)
        mgr.save(step, {"model": model, "optim": opt, "extra": {"seen": step * 10}}, epoch=step // 10,
                 metrics={"loss": loss})  # fmt: skip
    return mgr


@pytest.fixture
def tutorial_root(tmp_path: Path) -> str:
    root = str(tmp_path / "ckpt")
    save_steps(root, {10: 0.9, 20: 0.5, 30: 0.7})
    return root
