"""The native CPU ops (``csrc/``), and the pure-PyTorch fallback where they are not built.

``CMakeLists.txt`` builds them into one library of PyTorch operators, ``fastinstructor/_native<suffix>``, when the
package is installed with torch already there (``setup.py`` drives CMake; the Makefile installs so). An install
that cannot build them (no compiler, no CMake, torch missing at build time) says so in one line and installs
anyway: every op here then runs its reference in PyTorch. ``availability()`` says which, and why;
``FASTINSTRUCTOR_NATIVE=0`` turns the library off (the fallback's tests, and a way out if it misbehaves).

- ``varlen_attention(q, k, v, cu_seqlens, position_bias)``: packed T5 self-attention, each sequence reading its
  block of the batch's ``[H, Lmax, Lmax]`` relative position bias, the CPU twin of ``kernels.attention``; maths
  and reference: ``t5.varlen_attention_ref``.
"""

from __future__ import annotations

import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path

import torch

from .t5 import varlen_attention_ref

__all__ = ["availability", "library_path", "varlen_attention"]


def library_path() -> Path | None:
    """The built library beside this module, or None."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def availability() -> tuple[bool, str]:
    """(whether the native ops run, why or why not), decided once per process."""
    if os.environ.get("FASTINSTRUCTOR_NATIVE") == "0":
        return False, "turned off by FASTINSTRUCTOR_NATIVE=0: PyTorch fallback"
    path = library_path()
    if path is None:
        return False, (
            "not built (install with torch already installed, a C++17 compiler and CMake: "
            "pip install --no-build-isolation -e .): PyTorch fallback"
        )
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:  # built for another torch, or another CPU
        return False, f"{path.name} does not load ({err}); reinstall to rebuild it: PyTorch fallback"
    return True, f"native C++ ({path.name}, {torch.get_num_threads()} threads)"


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, position_bias: torch.Tensor
) -> torch.Tensor:
    """Packed T5 self-attention (``t5.varlen_attention_ref``'s maths), natively where built."""
    if availability()[0]:
        return torch.ops.fastinstructor.varlen_attention(q, k, v, cu_seqlens, position_bias)
    return varlen_attention_ref(q, k, v, cu_seqlens, position_bias)
