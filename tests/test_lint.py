"""DESIGN section 7: ruff with line length 120 (configured in pyproject.toml) stays clean."""

import subprocess
import sys
from pathlib import Path


def test_ruff_is_clean():
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
