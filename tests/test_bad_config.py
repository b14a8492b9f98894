"""Issue 13, defect 13: a config.json that disagrees with the weights is refused before anything is sized by it.

``num_layers: 10**9`` used to build a billion expected tensor names (tens of GiB) before the weights were
compared; a huge ``d_ff`` or ``num_heads`` was only caught after the weights were loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# Loads each checkpoint folder given, prints each error on one line, then this process's peak RSS in MiB.
_LOADER = """
import resource, sys
from fastinstructor.checkpoint import CheckpointError, load_checkpoint
for folder in sys.argv[1:]:
    try:
        load_checkpoint(folder)
        print("loaded")
    except CheckpointError as err:
        print(str(err).replace("\\n", " "))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _load_in_subprocess(folders) -> tuple[list[str], int]:
    """Each folder's outcome and the peak RSS (MiB) of one fresh process that loaded them all. Its private
    memory is capped at 3 GiB so that the old behaviour fails with MemoryError instead of exhausting the machine."""

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))

    result = subprocess.run(
        [sys.executable, "-c", _LOADER, *map(str, folders)], capture_output=True, text=True, timeout=300, preexec_fn=cap
    )
    assert result.returncode == 0, result.stderr[-2000:]
    *lines, rss = result.stdout.splitlines()
    return lines, int(rss)


@pytest.fixture
def bad_configs(tiny_model, tmp_path):
    """Copies of the tiny checkpoint (2 layers, 4 heads, d_ff 128), each with one config value far too large."""
    folders = {}
    for key, value, weights in (
        ("num_layers", 10**9, "safetensors"),
        ("num_layers", 10**9, "bin"),
        ("d_ff", 10**12, "safetensors"),
        ("num_heads", 10**9, "safetensors"),
        ("d_model", 10**9, "bin"),
    ):
        folder = shutil.copytree(tiny_model, tmp_path / f"{key}-{weights}")
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        if weights == "bin":  # a pickle must be loaded to be seen: its config is checked before the names are built
            torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
        folders[(key, weights)] = folder
    return folders


def test_defect13_config_that_disagrees_with_the_weights_fails_fast_in_bounded_memory(tiny_model, bad_configs):
    (loaded,), baseline_rss = _load_in_subprocess([tiny_model])
    assert loaded == "loaded"
    messages, rss = _load_in_subprocess(bad_configs.values())
    expected = {
        ("num_layers", "safetensors"): "num_layers is 1000000000, but the weights hold 2 encoder blocks",
        ("num_layers", "bin"): "num_layers is 1000000000, but the weights hold 2 encoder blocks",
        ("d_ff", "safetensors"): "d_ff is 1000000000000, but the weights hold 128 "
        "(encoder.block.0.layer.1.DenseReluDense.wi.weight has shape (128, 64))",
        ("num_heads", "safetensors"): "num_heads is 1000000000, but the weights hold 4 "
        "(encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight has shape (32, 4))",
        ("d_model", "bin"): "d_model is 1000000000, but the weights hold 64 (shared.weight has shape (2176, 64))",
    }
    for (case, folder), message in zip(bad_configs.items(), messages, strict=True):
        assert message.startswith(f"{folder / 'config.json'}: {expected[case]}"), message
        assert "restore the checkpoint's own config.json" in message, message
    # The old code reached its 3 GiB cap (MemoryError) on num_layers; refusing costs nothing beyond a good load.
    assert rss < baseline_rss + 128, f"peak RSS {rss} MiB refusing the bad configs, {baseline_rss} MiB loading"
