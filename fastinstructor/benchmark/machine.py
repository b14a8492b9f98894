"""The machine and the code a result was measured on: ``fastinstructor.hardware``'s probe (the one the dispatcher
uses), the thread count and library versions, and the checkout's commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch

from ..hardware import CPU_FLAGS, cpu_model, probe

__all__ = ["environment", "source_version"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, object]:
    """CPU model and flags, GPU, thread count and library versions."""
    from ..version import __version__

    hardware = probe()
    packages = hardware.packages
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": {flag: flag in hardware.cpu_flags for flag in CPU_FLAGS},
        "gpu": hardware.cuda_device,
        "cuda_capability": hardware.cuda_capability,
        "onnx_providers": list(hardware.onnx_providers),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "fastinstructor": __version__,
        "torch": packages["torch"],
        "transformers": packages["transformers"],
        "numpy": np.__version__,
        "onnxruntime": packages["onnxruntime"] or packages["onnxruntime-gpu"],
        "sentence_transformers": _version("sentence-transformers"),
        "triton": packages["triton"],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


def source_version() -> dict[str, object]:
    """The checkout's commit, and whether the package differs from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        # --no-optional-locks: read only, never refresh the index of a checkout others are working in.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except OSError:  # no git
        return {"git_commit": None, "package_modified": None}
    if head.returncode != 0:
        return {"git_commit": None, "package_modified": None}
    return {
        "git_commit": head.stdout.strip(),
        "package_modified": git("diff", "--quiet", "HEAD", "--", "fastinstructor").returncode != 0,
    }
