"""The encoder's matrix products (q/k/v, o and the FFN): ``y = act(x @ w^T)``, activation in the epilogue,
and an int8 path.

Maths::

    linear:       y[m, n] = act(sum_k x[m, k] * w[n, k])                        float32 accumulation
    linear_int8:  y[m, n] = act(sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k])     int32 accumulation

Layouts: ``x [M, K]`` (tokens x features), ``w [N, K]`` (PyTorch's Linear layout, no transpose copy);
int8: ``xq [M, K]`` int8 with one scale per token ``sx [M]``, ``wq [N, K]`` int8 with one scale per output
channel ``sw [N]`` (symmetric; ``kernels.quantize`` makes both). ``act`` is ``"none"`` or ``"relu"`` (T5's FFN).
The output dtype is chosen by the caller: float32 for T5's ``wo`` under float16 (its output overflows
float16 on trained weights, docs/design.md section 5), the compute dtype otherwise. Grid: one program per
``BLOCK_M x BLOCK_N`` output tile, walking K in ``BLOCK_K`` steps. Whether a product runs here or in cuBLAS,
and with which tile, is ``kernels.tuning``'s choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "linear",
    "linear_ref",
    "linear_int8",
    "linear_int8_ref",
    "DEFAULT_TILE",
    "TILE_CANDIDATES",
    "INT8_TILE_CANDIDATES",
]


@triton.jit
def _linear_kernel(
    X,
    W,
    Y,
    SX,
    SW,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    RELU: tl.constexpr,
    INT8: tl.constexpr,  # X and W are int8 with per-row scales SX [M] and SW [N]
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(
            X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0
        )
        w = tl.load(
            W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0
        )
        if INT8:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        else:
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if INT8:
        sx = tl.load(SX + offs_m, mask=m_mask, other=0.0)
        sw = tl.load(SW + offs_n, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    else:
        y = acc
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(
        Y + offs_m[:, None] * stride_ym + offs_n[None, :],
        y.to(Y.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# The tile each program computes and its launch shape: DEFAULT_TILE where nothing else is said (the sizes the
# interpreter tests run); on a GPU, kernels.tuning chooses among the candidates (and cuBLAS) by measurement.
DEFAULT_TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
TILE_CANDIDATES = [
    DEFAULT_TILE,
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
]
# int8's: the same and larger K steps, which int8's doubled tensor-core rate may need to stay fed.
INT8_TILE_CANDIDATES = [
    *TILE_CANDIDATES,
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
]


def resolve_tile(tile: dict | None, default: dict) -> dict:
    """``default`` with the entries of ``tile`` replaced; unknown names are an error."""
    unknown = set(tile or {}) - set(default)
    if unknown:
        raise ValueError(f"unknown tile settings {sorted(unknown)}; known: {', '.join(default)}")
    return {**default, **(tile or {})}


def _launch(x, w, sx, sw, activation: str, out_dtype: torch.dtype, int8: bool, tile: dict | None) -> torch.Tensor:
    if activation not in ("none", "relu"):
        raise ValueError(f"activation must be 'none' or 'relu', got {activation!r}")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w need contiguous rows; call .contiguous()")
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        tile = resolve_tile(tile, DEFAULT_TILE)
        grid = (triton.cdiv(m, tile["BLOCK_M"]), triton.cdiv(n, tile["BLOCK_N"]))
        _linear_kernel[grid](
            x,
            w,
            y,
            sx if int8 else y,
            sw if int8 else y,
            m,
            n,
            k,
            x.stride(0),
            w.stride(0),
            y.stride(0),
            RELU=activation == "relu",
            INT8=int8,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            **tile,
        )
    return y


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    tile: dict | None = None,
):
    """``act(x @ w^T)`` in ``out_dtype`` (default ``x.dtype``), float32 accumulation; ``tile`` overrides entries
    of ``DEFAULT_TILE``."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        raise ValueError(f"linear: x and w must share a float32/float16/bfloat16 dtype, got {x.dtype} and {w.dtype}")
    return _launch(x, w, None, None, activation, out_dtype or x.dtype, int8=False, tile=tile)


def linear_int8(
    xq: torch.Tensor,
    sx: torch.Tensor,
    wq: torch.Tensor,
    sw: torch.Tensor,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
    tile: dict | None = None,
) -> torch.Tensor:
    """``act(sx * sw * (xq @ wq^T))`` with int32 accumulation; ``tile`` as for ``linear``."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"linear_int8: xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if (
        sx.shape != (xq.shape[0],)
        or sw.shape != (wq.shape[0],)
        or sx.dtype != torch.float32
        or sw.dtype != torch.float32
    ):
        raise ValueError("linear_int8: scales must be float32, one per row of xq and of wq")
    return _launch(xq, wq, sx, sw, activation, out_dtype, int8=True, tile=tile)


def linear_ref(x: torch.Tensor, w: torch.Tensor, activation: str = "none", out_dtype: torch.dtype | None = None):
    y = x.float() @ w.float().t()
    return (torch.relu(y) if activation == "relu" else y).to(out_dtype or x.dtype)


def linear_int8_ref(xq, sx, wq, sw, activation: str = "none", out_dtype: torch.dtype = torch.float32):
    # float64 holds every int8 dot product up to K = 2**38 exactly, and unlike int64 it multiplies on CUDA too.
    y = (xq.double() @ wq.double().t()).float() * sx[:, None] * sw[None, :]
    return (torch.relu(y) if activation == "relu" else y).to(out_dtype)
