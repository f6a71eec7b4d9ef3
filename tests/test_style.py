"""The tree is linted and formatted as ruff.toml says (ruff comes with the test extra that install.sh installs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")


# --no-cache: a warm .ruff_cache in a working tree once hid an unformatted file that a fresh clone then failed on
@pytest.mark.parametrize(
    "command", [["check", "--no-cache", "."], ["format", "--no-cache", "--check", "."]], ids=["lint", "format"]
)
def test_ruff(command):
    assert RUFF.is_file(), f"{RUFF} missing: install the test extra (./install.sh does)"
    result = subprocess.run([str(RUFF), *command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
