"""The command line as a user runs it: real processes, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import fastinstructor


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastinstructor", *args], capture_output=True, text=True, cwd=cwd)


def test_demo_writes_embeddings_and_says_weights_are_random(tiny_model, tmp_path):
    result = run_cli("demo", "--model", str(tiny_model), "--limit", "20", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "RANDOM weights" in result.stdout
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    ids = (tmp_path / "out" / "ids.txt").read_text().splitlines()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert embeddings.shape == (20, 48) and len(ids) == 20 and run["random_weights"] is True
    # The demo's output is what the API gives for the same texts.
    from fastinstructor.data import sample_passages

    passages, _ = sample_passages(20)
    assert ids == [pid for pid, _ in passages]
    expected = fastinstructor.load(tiny_model).encode([[run["instruction"], text] for _, text in passages])
    np.testing.assert_allclose(embeddings, expected, atol=1e-6, rtol=0)


def test_make_test_model_command(tmp_path):
    result = run_cli("make-test-model", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "RANDOM-WEIGHT" in result.stdout and (tmp_path / "m" / "modules.json").is_file()
    again = run_cli("make-test-model", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert not list(tmp_path.glob(".m.partial-*"))


def test_errors_exit_non_zero_with_a_message(tmp_path):
    missing = run_cli("demo", "--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
    bad_preset = run_cli("make-test-model", "--preset", "huge", "--out", str(tmp_path / "x"))
    assert bad_preset.returncode == 2 and "invalid choice: 'huge'" in bad_preset.stderr
