"""Residual add + T5 RMSNorm, fused into one pass over each row.

Maths (T5LayerNorm, docs/design.md section 5: no mean subtraction, no bias, variance in float32)::

    s   = x + residual                     (when a residual is given; s = x otherwise)
    y   = weight * s / sqrt(mean(s ** 2) + eps)

Layouts: ``x``, ``residual``: ``[T, D]`` (T rows: tokens of a packed batch); ``weight``: ``[D]``.
Outputs: ``y [T, D]`` in ``out_dtype`` (default ``x.dtype``) and, with a residual, the new residual stream
``s [T, D]`` in ``residual.dtype`` (keep the residual stream float32 under float16 compute: T5 overflows float16
there). ``rms_norm_quantized`` writes ``y`` quantized per row instead, int8 or float8 with its scale
(``kernels.quantize``: the next projection's input, with no pass of its own). One program per row; the whole
row sits in one block (``BLOCK_D`` = next power of two of ``D``). The references, shared with the native CPU
op, are ``t5.rms_norm_ref`` and ``t5.rms_norm_quantized_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..t5 import check_quant_dtype, rms_norm_quantized_ref, rms_norm_ref
from .quantize import _quantize

__all__ = ["rms_norm", "rms_norm_quantized", "rms_norm_ref", "rms_norm_quantized_ref"]


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Y,
    S,  # pointers: input, residual, weight, output, new residual
    SCALE,  # QUANT: the output's scale per row
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,  # y quantized per row (Y int8 or float8) with its scale in SCALE
    QMAX: tl.constexpr,  # the quantized dtype's largest value
    INT8: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(S + row * stride_s + cols, s.to(S.dtype.element_ty), mask=mask)
    variance = tl.sum(s * s, axis=0) / D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = s * tl.rsqrt(variance + eps) * w
    if QUANT:
        _quantize(y, Y, SCALE, row, stride_y, cols, mask, QMAX, INT8)
    else:
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.ndim != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: expected x [T, D] and weight [D], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} on {residual.device} must match x "
            f"{tuple(x.shape)} on {x.device}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rms_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm: rows must be contiguous (stride 1 along D); call .contiguous()")


def _launch(x, weight, eps, residual, y, scale, qmax: float) -> torch.Tensor | None:
    rows, d = x.shape
    s = torch.empty_like(residual) if residual is not None else None
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            y,
            s if s is not None else y,
            scale if scale is not None else weight,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            y.stride(0),
            s.stride(0) if s is not None else 0,
            d,
            eps,
            HAS_RESIDUAL=residual is not None,
            QUANT=scale is not None,
            QMAX=qmax,
            INT8=y.dtype == torch.int8,
            BLOCK_D=triton.next_power_of_2(d),
        )
    return s


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, s)``: the normalized rows in ``out_dtype`` (default ``x.dtype``) and, with ``residual``, the new
    residual stream (else None)."""
    _check(x, weight, residual)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    return y, _launch(x, weight, eps, residual, y, None, 0.0)


def rms_norm_quantized(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int8,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``((q, scale), s)``: as ``rms_norm``, with ``y`` quantized per row to ``dtype`` (int8 or float8_e4m3fn)."""
    _check(x, weight, residual)
    qmax = check_quant_dtype(dtype)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    return (q, scale), _launch(x, weight, eps, residual, q, scale, qmax)
