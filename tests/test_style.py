"""The style the code promises (STYLE.md): formatted by ruff at 100 columns, lint-clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = ["pipeline", "stages", "tests", "bench"]


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff comes with the test extra"
)
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *TREES],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
