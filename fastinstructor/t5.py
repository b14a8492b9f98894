"""T5 encoder maths shared by the backends, the kernels' references and the ONNX export.

The relative position buckets, RMSNorm, the INSTRUCTOR pooling head, and transformers' ``T5EncoderModel``
loaded from a checkpoint (the float32 reference, and what the export traces). This module imports nothing
from the backends, so the kernels and the export can use it without depending on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint

__all__ = ["relative_position_bucket", "rms_norm", "pool_head", "hf_encoder"]


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5LayerNorm: no mean subtraction, no bias, variance in float32."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps))


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
