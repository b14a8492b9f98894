"""T5 encoder maths shared by the backends, the kernels' references and the ONNX export.

The relative position buckets and bias, packed (varlen) attention, RMSNorm, per-row quantization, the
INSTRUCTOR pooling head (padded and packed), and transformers' ``T5EncoderModel`` loaded from a checkpoint (the
float32 reference, and what the export traces). The ``*_ref`` functions are the one reference of each encoder
op that two implementations share: the Triton kernels (``kernels/``) and the native CPU ops (``csrc/``, through
``fastinstructor.native``). This module imports nothing from the backends, so the kernels and the export can use
it without depending on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint

__all__ = [
    "relative_position_bucket",
    "position_bias_matrix",
    "varlen_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_quantized_ref",
    "QUANT_DTYPES",
    "check_quant_dtype",
    "quantize_rows_ref",
    "pool_head",
    "packed_mean_pool",
    "dense_and_normalize",
    "hf_encoder",
]


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets: half per direction, exact below num_buckets/4, log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def position_bias_matrix(bias_table: torch.Tensor, max_len: int, max_distance: int) -> torch.Tensor:
    """``[H, max_len, max_len]`` float32: T5's relative position bias of a sequence of ``max_len`` tokens (query
    ``i``, key ``j``), from the ``[num_buckets, H]`` table through its buckets. It depends only on ``j - i``, so a
    shorter sequence's bias is its top-left block: one matrix serves a whole packed batch and every layer."""
    positions = torch.arange(max_len, device=bias_table.device)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], bias_table.shape[0], max_distance)
    return bias_table.float()[buckets].permute(2, 0, 1).contiguous()


def varlen_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, position_bias: torch.Tensor
) -> torch.Tensor:
    """T5 self-attention over packed sequences, in float32, one sequence at a time::

        o[i] = sum_j softmax_j(q[i] . k[j] + position_bias[h, i, j]) v[j]       over the tokens j of i's sequence

    ``q``, ``k``, ``v``: ``[T, H, D]``; ``cu_seqlens [B + 1]``; ``position_bias [H, Lmax, Lmax]``
    (``position_bias_matrix``; a sequence of ``L`` tokens reads its top-left ``[L, L]`` block). No 1/sqrt(d)
    scaling (docs/design.md section 5). Returns ``q``'s dtype."""
    out = torch.empty_like(q)
    for b in range(cu_seqlens.shape[0] - 1):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        bias = position_bias[:, : hi - lo, : hi - lo].float()  # [H, L, L]
        qs, ks, vs = (t[lo:hi].float().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        weights = torch.softmax(qs @ ks.transpose(1, 2) + bias, dim=-1)
        out[lo:hi] = (weights @ vs).transpose(0, 1).to(q.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5LayerNorm: no mean subtraction, no bias, variance in float32."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps))


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual add and RMSNorm between two products, as one op::

        s = x + residual            (float32; just x without a residual)
        y = weight * s / sqrt(mean(s^2) + eps)

    ``(y, s)``: ``y`` in ``out_dtype`` (default ``x``'s), and ``s`` (the new residual stream, in ``residual``'s
    dtype) or None without a residual. Reference of ``kernels.rms_norm`` and the native op."""
    s = x.float() if residual is None else x.float() + residual.float()
    y = rms_norm(s, weight.float(), eps)
    return y.to(out_dtype or x.dtype), None if residual is None else s.to(residual.dtype)


def rms_norm_quantized_ref(x, weight, eps: float = 1e-6, residual=None, dtype: torch.dtype = torch.int8):
    """``rms_norm_ref`` with ``y`` quantized per row (``quantize_rows_ref``): ``((q, scale), s)``."""
    y, s = rms_norm_ref(x, weight, eps, residual, torch.float32)
    return quantize_rows_ref(y, dtype), s


# The quantized dtypes and the largest value each holds.
QUANT_DTYPES = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def check_quant_dtype(dtype: torch.dtype) -> float:
    """QMAX of ``dtype``; a ValueError naming the choices otherwise."""
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"quantize to int8 or float8_e4m3fn, not {dtype}")
    return QUANT_DTYPES[dtype]


def quantize_rows_ref(
    x: torch.Tensor, dtype: torch.dtype = torch.int8, relu: bool = False, reduce_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token, or per output channel for a weight) symmetric quantization, in float32 arithmetic::

        amax  = max(max |x|, 1e-8)                 (of relu(x) with ``relu``)
        scale = amax / QMAX                        QMAX = 127 (int8) or 448 (float8 e4m3's largest finite value)
        q     = round_half_away(x * QMAX / amax)   clamped to [-QMAX, QMAX] (int8; float8: round to nearest even)

    ``(q, scale [rows] float32)`` with ``x ~= q * scale[:, None]``. Reference of ``kernels.quantize`` and the
    native op; the weights' quantization at load. ``reduce_range`` (int8 only): 7 bits, QMAX = 63, for the weights
    of an x86 int8 product on a CPU without VNNI, which multiplies u8 x s8 pairs into 16 bits (``hardware.VNNI``):
    with |q| <= 63 no pair's sum passes 2 x 255 x 63 = 32130 < 2^15."""
    if reduce_range and dtype != torch.int8:
        raise ValueError(f"reduce_range is for int8, not {dtype}")
    qmax = 63.0 if reduce_range else check_quant_dtype(dtype)
    x = torch.relu(x.float()) if relu else x.float()
    amax = x.abs().amax(dim=1).clamp_min(1e-8)
    y = x * (qmax / amax)[:, None]
    if dtype == torch.int8:
        y = torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).clamp(-qmax, qmax)
    return y.to(dtype), amax / qmax


def pool_head(
    hidden: torch.Tensor,  # [B, L, D] final (normalized) encoder states
    attention_mask: torch.Tensor,  # [B, L]
    pool_start: torch.Tensor,  # [B] first pooled position (instruction length)
    dense_weight: torch.Tensor | None,  # [out_dim, D]
    normalize: bool,
) -> torch.Tensor:  # [B, out_dim] float32
    """Mean over positions ``pool_start..`` that are not padding, then Dense, then L2 normalize."""
    hidden = hidden.float()
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    mask = (attention_mask.bool() & (positions[None, :] >= pool_start[:, None])).to(hidden.dtype)  # [B, L]
    pooled = torch.einsum("bld,bl->bd", hidden, mask) / mask.sum(1, keepdim=True).clamp_min(1e-9)
    return dense_and_normalize(pooled, dense_weight, normalize)


def packed_mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
    """``pool_head``'s mean over packed states: ``hidden [T, D]``, sequence ``b`` its tokens
    ``cu_seqlens[b]:cu_seqlens[b + 1]``, pooled from ``pool_start[b]`` on; ``[B, D]`` float32 (0 where nothing is
    pooled). The reference of ``kernels.pooling``, and the cpu backend's packed pooling."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    batch = lengths.shape[0]
    sequence = torch.repeat_interleave(torch.arange(batch, device=hidden.device), lengths)  # [T]
    position = torch.arange(hidden.shape[0], device=hidden.device) - cu[:-1][sequence]
    keep = position >= pool_start.long()[sequence]
    sums = hidden.new_zeros((batch, hidden.shape[1]), dtype=torch.float32)
    sums.index_add_(0, sequence[keep], hidden[keep].float())
    counts = torch.bincount(sequence[keep], minlength=batch).float().clamp_min(1e-9)
    return sums / counts[:, None]


def dense_and_normalize(pooled: torch.Tensor, dense_weight: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """The pooling head after the mean: Dense (no bias), then L2 normalize."""
    if dense_weight is not None:
        pooled = pooled @ dense_weight.t()
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=1)  # eps 1e-12, as sentence-transformers' Normalize
    return pooled


def hf_encoder(checkpoint: Checkpoint, device: str | torch.device = "cpu"):
    """transformers' ``T5EncoderModel`` in float32 eager attention with the checkpoint's weights, in eval mode."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_dict(checkpoint.hf_config)
    config._attn_implementation = "eager"
    with torch.device("meta"):  # no random initialization: every tensor comes from the checkpoint
        model = T5EncoderModel(config)
    model.load_state_dict(checkpoint.weights, strict=False, assign=True)
    model.tie_weights()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors not loaded from the checkpoint: {leftovers}")
    return model.to(device).eval()
