"""``ckptstore verify`` on a step whose layout checksums groups of parts (format 2 with a group size ``k``): a
flipped byte in one part fails its whole group, and the command says so and exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptstore.format.manifest import Manifest
from ckptstore.storage.local import LocalStorage
from tests.faults.test_group_crc_damage import flip_in_neighbour
from tests.unit.test_group_crc import _full_state, _save_simulated

from .conftest import cli

pytestmark = pytest.mark.cli


def test_verify_reports_a_damaged_checksum_group(tmp_path: Path) -> None:
    _save_simulated(LocalStorage(str(tmp_path)), 3, _full_state(3))
    ok = cli("verify", str(tmp_path), "3")
    assert ok.code == 0, ok
    m = Manifest.from_bytes((tmp_path / "step-000000000003" / "manifest.json").read_bytes())
    flip_in_neighbour(tmp_path, m, "emb")
    bad = cli("verify", str(tmp_path), "3")
    assert bad.code != 0 and "checksum group" in bad.out + bad.err, bad
