"""The native CPU ops (``csrc/``), and the pure-PyTorch fallback where they are not built.

``CMakeLists.txt`` builds them into one library of PyTorch operators, ``fastinstructor/_native<suffix>``, when the
package is installed with torch already there (``setup.py`` drives CMake; the Makefile installs so). An install
that cannot build them (no compiler, no CMake, torch missing at build time) says so in one line and installs
anyway: every op here then runs its reference in PyTorch. ``availability()`` says which, and why;
``FASTINSTRUCTOR_NATIVE=0`` turns the library off (the fallback's tests, and a way out if it misbehaves).

Each op is the CPU twin of a Triton kernel, with the same signature and the same reference in ``t5``:

- ``varlen_attention(q, k, v, cu_seqlens, position_bias, x_scale)``: packed T5 self-attention, each sequence
  reading its block of the batch's ``[H, Lmax, Lmax]`` relative position bias (``kernels.attention``;
  ``t5.varlen_attention_ref``), and ``varlen_attention_quantized``, its output quantized per token to int8 as it is
  written (``t5.quantize_rows_ref``);
- ``rms_norm(x, weight, eps, residual, out_dtype)``: the residual add and RMSNorm in one pass over each row
  (``kernels.rms_norm``; ``t5.rms_norm_ref``), and ``rms_norm_quantized``, its output quantized per row to int8
  (``t5.rms_norm_quantized_ref``);
- ``quantize_rows(x)``: per-row symmetric int8 quantization (``kernels.quantize``; ``t5.quantize_rows_ref``).

Each reads its input as ``x * x_scale[:, None]`` when given a per-token ``x_scale``: the activations' scale an int8
product (``backends.cpu.Int8Linear``) leaves to the op after it, where the Triton int8 products apply it in their
epilogue.
"""

from __future__ import annotations

import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path

import torch

from .t5 import quantize_rows_ref, rms_norm_quantized_ref, rms_norm_ref, varlen_attention_ref

__all__ = [
    "availability",
    "library_path",
    "quantize_rows",
    "rms_norm",
    "rms_norm_quantized",
    "varlen_attention",
    "varlen_attention_quantized",
]


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
    # The threads its loops ran on, asked of the library: 1 where it was built without torch's OpenMP.
    threads = torch.ops.fastinstructor.parallel_threads()
    kernel = "oneDNN brgemm" if torch.ops.fastinstructor.brgemm_attention_runs() else "ATen's fused attention"
    return True, f"native C++ ({path.name}, {threads} threads; bfloat16 attention on {kernel})"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_bias: torch.Tensor,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed T5 self-attention (``t5.varlen_attention_ref``'s maths) of ``q``, ``k`` and ``v`` read as
    ``x * x_scale[:, None, None]`` (``x_scale [T]`` or None), natively where built."""
    if availability()[0]:
        return torch.ops.fastinstructor.varlen_attention(q, k, v, cu_seqlens, position_bias, x_scale)
    if x_scale is not None:  # each product rounded to the inputs' dtype, as the native op scales them
        q, k, v = ((x.float() * x_scale[:, None, None]).to(x.dtype) for x in (q, k, v))
    return varlen_attention_ref(q, k, v, cu_seqlens, position_bias)


def varlen_attention_quantized(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_bias: torch.Tensor,
    x_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, H * d] int8, scale [T] float32)``: ``varlen_attention``'s output with each token's row quantized
    (``t5.quantize_rows_ref``), as the o product takes it; natively where built, in one op."""
    if availability()[0]:
        return torch.ops.fastinstructor.varlen_attention_quantized(q, k, v, cu_seqlens, position_bias, x_scale)
    out = varlen_attention(q, k, v, cu_seqlens, position_bias, x_scale)
    return quantize_rows_ref(out.reshape(out.shape[0], -1), torch.int8)


def _scaled(x: torch.Tensor, x_scale: torch.Tensor | None) -> torch.Tensor:
    """The fallbacks' view of ``x_scale``: ``x * x_scale[:, None]`` in float32."""
    return x if x_scale is None else x.float() * x_scale[:, None]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    x_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, s)``: the residual add and RMSNorm of ``x * x_scale[:, None]`` (``t5.rms_norm_ref``'s maths; ``s`` None
    without a residual), natively where built. ``x`` float32 or bfloat16, ``residual`` float32 (the native op
    writes ``s`` into it and returns it), ``out_dtype`` float32 or bfloat16, ``x_scale [T]`` or None."""
    if availability()[0]:
        return torch.ops.fastinstructor.rms_norm(x, weight, eps, residual, out_dtype, x_scale), residual
    return rms_norm_ref(_scaled(x, x_scale), weight, eps, residual, out_dtype or x.dtype)


def rms_norm_quantized(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``((q, scale), s)``: ``rms_norm`` with its output quantized per row to int8
    (``t5.rms_norm_quantized_ref``), natively where built."""
    if availability()[0]:
        return torch.ops.fastinstructor.rms_norm_quantized(x, weight, eps, residual, x_scale), residual
    return rms_norm_quantized_ref(_scaled(x, x_scale), weight, eps, residual)


def quantize_rows(
    x: torch.Tensor, relu: bool = False, x_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, D] int8, scale [T] float32)``: per-row symmetric quantization of ``x * x_scale[:, None]``
    (``t5.quantize_rows_ref``), natively where built."""
    if availability()[0]:
        return torch.ops.fastinstructor.quantize_rows(x, relu, x_scale)
    return quantize_rows_ref(_scaled(x, x_scale), torch.int8, relu)
