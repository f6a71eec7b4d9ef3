"""The tree is linted and formatted as ruff.toml says (ruff comes with the test extra that install.sh installs),
and no file outgrows one idea."""

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


MAX_SOURCE_LINES = 600  # past this a file holds more than one idea (ARCHITECTURE.md)


def test_no_python_file_is_over_the_line_limit():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    if not tracked:
        pytest.fail("git ls-files found no Python file: run the suite from a git checkout")
    lengths = {name: len((REPO / name).read_text().splitlines()) for name in tracked if (REPO / name).is_file()}
    over = {name: n for name, n in lengths.items() if n > MAX_SOURCE_LINES}
    assert not over, f"over {MAX_SOURCE_LINES} lines: {over}"
