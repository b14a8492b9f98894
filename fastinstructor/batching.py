"""Cutting tokenized inputs into batches: sorted by length, bounded by a row count and a token budget."""

from __future__ import annotations

import torch

__all__ = ["plan_batches", "pad_batch"]


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices per batch, longest first, so each batch pads to a similar length.

    A batch holds at most ``batch_size`` rows and, when ``max_batch_tokens`` is set, at most that many
    padded tokens (rows x longest row); a single row longer than the budget gets a batch of its own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive number of tokens or None, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Descending order: the first row of a batch is its longest, so padded size = rows * that length.
        full = len(current) >= batch_size or (
            max_batch_tokens is not None and current and (len(current) + 1) * lengths[current[0]] > max_batch_tokens
        )
        if full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(ids: list[list[int]], pool_start: list[int], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-pad to the batch maximum: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``pool_start [B]``."""
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor(pool_start, dtype=torch.long)
