"""The backend interface (DESIGN section 3) and the pooling head every PyTorch backend shares."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

__all__ = ["Backend", "pool_head", "check_precision"]


class Backend(Protocol):
    """A forward pass: token ids in, one embedding per row out.

    ``embed`` returns ``[B, out_dim]`` float32: instruction-masked mean pooling, the Dense projection
    when the checkpoint has one, and L2 normalization when it has a Normalize module.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    @classmethod
    def availability(cls) -> tuple[bool, str]: ...

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor
    ) -> torch.Tensor: ...


def check_precision(backend: type, precision: str) -> None:
    if precision not in backend.precisions:
        raise ValueError(
            f"backend {backend.name!r} does not support precision {precision!r}; "
            f"choose one of {', '.join(backend.precisions)}"
        )


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
