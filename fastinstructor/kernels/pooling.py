"""Instruction-masked mean pooling over packed (unpadded) sequences.

Maths (docs/design.md section 4): for sequence ``b`` with tokens ``cu_seqlens[b] .. cu_seqlens[b+1]`` of the packed
states, pool over the tokens from ``pool_start[b]`` (the instruction's token count) to the end::

    out[b] = sum(hidden[cu[b] + pool_start[b] : cu[b+1]]) / max(count, 1e-9)      (0 when nothing is pooled)

Layouts: ``hidden [T, D]`` (any float dtype, accumulated in float32), ``cu_seqlens [B + 1]`` int32/int64
(cumulative lengths, starting at 0), ``pool_start [B]``; output ``[B, D]`` float32. The Dense projection and
the L2 normalize follow in the backend as one matrix product and a normalize; whether fusing them into this
kernel pays has yet to be measured on a GPU. Grid: one program per (sequence, block of ``BLOCK_D``
features); each walks its sequence's tokens ``BLOCK_T`` at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..t5 import packed_mean_pool

__all__ = ["masked_mean_pool", "masked_mean_pool_ref"]


@triton.jit
def _masked_mean_pool_kernel(
    H,
    CU,
    START,
    OUT,
    stride_h,
    stride_o,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    begin = tl.load(CU + seq).to(tl.int64)
    end = tl.load(CU + seq + 1).to(tl.int64)
    first = tl.minimum(begin + tl.load(START + seq).to(tl.int64), end)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(first, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < end)[:, None] & col_mask[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(h.to(tl.float32), axis=0)
    count = tl.maximum((end - first).to(tl.float32), 1e-9)
    tl.store(OUT + seq * stride_o + cols, acc / count, mask=col_mask)


def masked_mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` float32 means over each sequence's tokens from ``pool_start`` on."""
    if hidden.ndim != 2 or hidden.stride(1) != 1:
        raise ValueError(f"masked_mean_pool: hidden must be [T, D] with contiguous rows, got {tuple(hidden.shape)}")
    if cu_seqlens.ndim != 1 or pool_start.shape != (cu_seqlens.shape[0] - 1,):
        raise ValueError(
            f"masked_mean_pool: expected cu_seqlens [B + 1] and pool_start [B], got {tuple(cu_seqlens.shape)} and "
            f"{tuple(pool_start.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or pool_start.dtype not in (torch.int32, torch.int64):
        raise ValueError("masked_mean_pool: cu_seqlens and pool_start must be int32 or int64")
    batch, d = pool_start.shape[0], hidden.shape[1]
    out = torch.empty((batch, d), dtype=torch.float32, device=hidden.device)
    if batch:
        block_d = min(triton.next_power_of_2(d), 128)
        _masked_mean_pool_kernel[(batch, triton.cdiv(d, block_d))](
            hidden, cu_seqlens, pool_start, out, hidden.stride(0), out.stride(0), d, BLOCK_T=16, BLOCK_D=block_d
        )
    return out


def masked_mean_pool_ref(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
    """The same in plain PyTorch: ``t5.packed_mean_pool``."""
    return packed_mean_pool(hidden, cu_seqlens, pool_start)
