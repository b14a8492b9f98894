"""The command line as a user runs it: real processes, exit codes, messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastinstructor import read_embeddings

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastinstructor", *args], capture_output=True, text=True, cwd=cwd)


def test_make_test_model_command(tmp_path):
    result = run_cli("make-test-model", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "RANDOM-WEIGHT" in result.stdout and (tmp_path / "m" / "modules.json").is_file()
    again = run_cli("make-test-model", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert not list(tmp_path.glob(".m.partial-*"))


def test_errors_exit_non_zero_with_a_message(tmp_path):
    missing = run_cli(
        "embed",
        "--model",
        str(tmp_path / "nowhere"),
        "--input",
        __file__,
        "--input-format",
        "text",
        "--output",
        str(tmp_path / "out"),
    )
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
    bad_preset = run_cli("make-test-model", "--preset", "huge", "--out", str(tmp_path / "x"))
    assert bad_preset.returncode == 2 and "invalid choice: 'huge'" in bad_preset.stderr


@pytest.mark.skipif(
    not (REPO / ".venv" / ".installed").is_file(), reason="runs `make demo`, which needs `make setup` first"
)
def test_make_demo(tiny_model, tmp_path):
    """The README's demo command, on the tiny model instead of the base one to keep the suite fast."""
    out = tmp_path / "demo-output"
    result = subprocess.run(
        ["make", "-s", "demo", f"DEMO_MODEL={tiny_model}", f"DEMO_OUT={out}"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded 500 rows" in result.stdout and "RANDOM weights" in result.stdout
    ids, embeddings = read_embeddings(out)
    assert len(ids) == 500 and embeddings.shape == (500, 48)
