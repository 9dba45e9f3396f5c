"""The README's main job as a test: SIGTERM to a 2-rank DDP run under torchrun, resume, bit-exact result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "train.py"


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_preempted_ddp_run_resumes_bit_exactly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "demo", "--root", str(tmp_path / "ck"), "--steps", "20", "--preempt-after", "10"],
        capture_output=True,
        text=True,
        timeout=380,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Both ranks agreed on one preemption step, saved it and exited 0.
    assert out.count("exiting cleanly") == 2, out[-4000:]
    saved = [line for line in out.splitlines() if "(preemption)" in line]
    assert len(saved) == 1, out[-4000:]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert f"resumed from step {step}" in out
    assert "torchrun exit code 0" in out
    assert "bit for bit: model True, optimizer True" in out and "[demo] OK" in out
