"""T5 encoder self-attention, FlashAttention-style, over packed (unpadded) sequences, with the relative
position bias computed inside the kernel.

Maths (docs/design.md section 5: no 1/sqrt(d) scaling, softmax in float32, one bias table shared by all layers)::

    o[i] = sum_j softmax_j(q[i] . k[j] + table[bucket(j - i), h]) v[j]       over the tokens j of i's sequence

``bucket`` is T5's bidirectional bucketing (half the buckets per direction, exact below ``num_buckets/4``,
log-spaced up to ``max_distance``), evaluated in the kernel from the ``[num_buckets, heads]`` table: no
``[B, H, L, L]`` bias tensor exists. The log-spaced part adds 1e-4 before truncating so that a last-ulp
difference in ``log`` cannot move a distance that sits exactly on a bucket boundary (16, 32, 64 for the
default 32 buckets / 128; PyTorch's float32 arithmetic lands exactly on those integers).

Layouts: ``q``, ``k``, ``v``, ``o``: ``[T, H, D]`` packed tokens; ``cu_seqlens [B + 1]`` (cumulative lengths);
``bias_table [num_buckets, H]``. float32, float16 or bfloat16 inputs, float32 accumulation and online
softmax; head dims up to 128 (instructor-xl). Grid: (query blocks, H), with no program for a block past a
short sequence's end: sequence ``b`` owns the blocks from ``cu[b] // BLOCK_M + b`` on (at least its
``cdiv(length, BLOCK_M)`` blocks, at most one to spare; ``T // BLOCK_M + B`` in all), and a program finds its
sequence by binary search over ``cu_seqlens``. Each program streams its sequence's keys ``BLOCK_N`` at a time.
A grid of (blocks of the longest sequence, B, H) would launch mostly empty programs on a batch of mixed
lengths. ``t5_attention_padded`` is the ``[B, H, L, D]``
entry point with a key padding mask, for comparison with padded implementations.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..t5 import position_bias_matrix, varlen_attention_ref  # the reference maths (transformers' arithmetic)
from .matmul import resolve_tile

__all__ = ["t5_attention", "t5_attention_padded", "t5_attention_ref", "DEFAULT_TILE", "TILE_CANDIDATES"]


@triton.jit
def _t5_attention_kernel(
    Q,
    K,
    V,
    OUT,
    CU,
    TABLE,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_tb,
    LOG_RATIO,  # log(max_distance / max_exact), float32
    NUM_SEQS,  # B
    SEARCH_STEPS,  # ceil(log2(B)) + 1: the binary search's steps
    HALF_BUCKETS: tl.constexpr,  # num_buckets // 2: buckets per direction
    MAX_EXACT: tl.constexpr,  # HALF_BUCKETS // 2: distances below this have their own bucket
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), "tf32" otherwise (ignored for halves)
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    # The sequence that owns this block: the last b with first_block(b) = cu[b] // BLOCK_M + b <= block.
    lo = 0
    hi = NUM_SEQS
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        owns = tl.load(CU + mid) // BLOCK_M + mid <= block
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid)
    seq = lo
    start = tl.load(CU + seq).to(tl.int64)
    length = (tl.load(CU + seq + 1) - tl.load(CU + seq)).to(tl.int32)
    block_m = block - (tl.load(CU + seq) // BLOCK_M + seq)
    if block_m * BLOCK_M >= length:
        return  # the sequence's spare block, or past the last sequence
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < length
    q = tl.load(
        Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        k = tl.load(
            K + (start + offs_n)[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] float32, scale 1.0
        # Relative position bias, from the bucket of (key position - query position).
        rel = offs_n[None, :] - offs_m[:, None]
        distance = tl.abs(rel)
        log_spaced = (
            tl.log(tl.maximum(distance, 1).to(tl.float32) / MAX_EXACT) / LOG_RATIO * (HALF_BUCKETS - MAX_EXACT) + 1e-4
        ).to(tl.int32) + MAX_EXACT
        bucket = tl.where(distance < MAX_EXACT, distance, tl.minimum(log_spaced, HALF_BUCKETS - 1))
        bucket += tl.where(rel > 0, HALF_BUCKETS, 0)
        s += tl.load(TABLE + bucket * stride_tb + head).to(tl.float32)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Online softmax (float32).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + (start + offs_n)[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


# Untuned, as for kernels.matmul: bench/gpu_triton.py sweeps TILE_CANDIDATES on a GPU.
DEFAULT_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
TILE_CANDIDATES = [
    DEFAULT_TILE,
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
]


def t5_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, H, D]
    v: torch.Tensor,  # [T, H, D]
    cu_seqlens: torch.Tensor,  # [B + 1]
    bias_table: torch.Tensor,  # [num_buckets, H]
    max_distance: int = 128,
    tile: dict | None = None,
) -> torch.Tensor:  # [T, H, D]
    """Packed T5 self-attention with the relative position bias computed in the kernel; ``tile`` overrides
    entries of ``DEFAULT_TILE``."""
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"t5_attention: q, k, v must be [T, H, D] of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"t5_attention: q, k, v must share a float32/float16/bfloat16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    tokens, heads, head_dim = q.shape
    if head_dim > 128 or any(t.stride(2) != 1 for t in (q, k, v)):
        raise ValueError(f"t5_attention: head dim must be at most 128 with contiguous features, got {head_dim}")
    num_buckets = bias_table.shape[0]
    if bias_table.ndim != 2 or bias_table.shape[1] != heads or num_buckets < 4 or num_buckets % 4:
        raise ValueError(
            f"t5_attention: bias_table must be [num_buckets, {heads}] with num_buckets a multiple of "
            f"4, got {tuple(bias_table.shape)}"
        )
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"t5_attention: cu_seqlens must be int32/int64 [B + 1] ending at T={tokens}")
    if cu_seqlens.is_cuda:  # checked on the GPU: reading the value on the host would stall every call
        torch._assert_async(cu_seqlens[-1] == tokens)
    elif int(cu_seqlens[-1]) != tokens:
        raise ValueError(f"t5_attention: cu_seqlens must be int32/int64 [B + 1] ending at T={tokens}")
    half = num_buckets // 2
    max_exact = half // 2
    out = torch.empty_like(q)
    batch = cu_seqlens.shape[0] - 1
    if tokens == 0 or batch == 0:
        return out
    tile = resolve_tile(tile, DEFAULT_TILE)
    grid = (tokens // tile["BLOCK_M"] + batch, heads)
    _t5_attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        bias_table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        bias_table.stride(0),
        math.log(max_distance / max_exact),
        batch,
        batch.bit_length() + 1,
        HALF_BUCKETS=half,
        MAX_EXACT=max_exact,
        HEAD_DIM=head_dim,
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **tile,
    )
    return out


def t5_attention_padded(
    q: torch.Tensor,  # [B, H, L, D]
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor,  # [B, L], 1 for tokens (right padding)
    bias_table: torch.Tensor,
    max_distance: int = 128,
) -> torch.Tensor:  # [B, H, L, D], zeros at padded query positions
    """The padded entry point: pack the real tokens, run the kernel, scatter back."""
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
    cu[1:] = lengths.cumsum(0)

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2)[keep].contiguous()  # [T, H, D]

    packed = t5_attention(pack(q), pack(k), pack(v), cu, bias_table, max_distance)
    out = torch.zeros_like(q.transpose(1, 2))
    out[keep] = packed
    return out.transpose(1, 2)


def t5_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bias_table: torch.Tensor,
    max_distance: int = 128,
) -> torch.Tensor:
    """``t5.varlen_attention_ref`` (float32, the bias materialized per sequence) from the bucket table."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    max_len = max(int(lengths.max()) if len(lengths) else 1, 1)
    return varlen_attention_ref(q, k, v, cu_seqlens, position_bias_matrix(bias_table, max_len, max_distance))
