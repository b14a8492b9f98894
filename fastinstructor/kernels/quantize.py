"""Per-row (per-token) symmetric quantization to int8 or float8 (e4m3), one pass over each row.

Maths, for a row ``x`` (after ``relu`` when asked: T5's FFN activation, fused here before ``wo``)::

    amax  = max(max |x|, 1e-8)
    scale = amax / QMAX                    QMAX = 127 (int8) or 448 (float8 e4m3's largest finite value)
    q     = round_half_away(x * (QMAX / amax))   clamped to [-127, 127]    (int8)
    q     = (x * (QMAX / amax)).to(e4m3)                                   (float8: round to nearest even)

so that ``x ~= q * scale``. The weights are quantized once at load by ``t5.quantize_rows_ref`` (the same
arithmetic in torch, per output channel; the reference shared with the native CPU op); the activations at run
time by ``quantize_rows`` (a Triton kernel), or fused into the RMSNorm that produces them (``kernels.rms_norm``,
the same ``_quantize`` helper). Layouts: ``x [T, D]`` with contiguous rows; ``q [T, D]`` int8 or float8_e4m3fn,
``scale [T]`` float32. One program per row; the whole row sits in one block (``BLOCK_D`` = next power of two of ``D``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..t5 import QUANT_DTYPES, check_quant_dtype, quantize_rows_ref

# The maths, QUANT_DTYPES and the reference are t5's, shared with the native CPU op.
__all__ = ["QUANT_DTYPES", "check_quant_dtype", "quantize_rows", "quantize_rows_ref"]


@triton.jit
def _quantize(x, Q, SCALE, row, stride_q, cols, mask, QMAX: tl.constexpr, INT8: tl.constexpr):
    """Store the quantized ``x`` (a float32 row) and its scale; shared with the fused RMSNorm kernel."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8)
    y = x * (QMAX / amax)
    if INT8:  # round half away from zero, as quantize_rows_ref
        y = tl.minimum(tl.maximum((y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32), -127), 127)
    tl.store(Q + row * stride_q + cols, y.to(Q.dtype.element_ty), mask=mask)
    tl.store(SCALE + row, amax / QMAX)


@triton.jit
def _quantize_rows_kernel(
    X,
    Q,
    SCALE,
    stride_x,
    stride_q,
    D,
    RELU: tl.constexpr,
    QMAX: tl.constexpr,
    INT8: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        x = tl.maximum(x, 0.0)
    _quantize(x, Q, SCALE, row, stride_q, cols, mask, QMAX, INT8)


def quantize_rows(
    x: torch.Tensor, dtype: torch.dtype = torch.int8, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, D], scale [T] float32)`` with ``x ~= q * scale[:, None]`` (``relu(x)`` with ``relu``)."""
    qmax = check_quant_dtype(dtype)
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows: x must be [T, D] with contiguous rows, got {tuple(x.shape)}")
    rows, d = x.shape
    q = torch.empty((rows, d), dtype=dtype, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows and d:
        _quantize_rows_kernel[(rows,)](
            x,
            q,
            scale,
            x.stride(0),
            q.stride(0),
            d,
            RELU=relu,
            QMAX=qmax,
            INT8=dtype == torch.int8,
            BLOCK_D=triton.next_power_of_2(d),
        )
    return q, scale
