"""Cutting tokenized inputs into batches: one ``BatchPolicy`` (rows and padded tokens per batch at most), used by
``Instructor.encode``, the embed job and the server, and ``pad_batch``, the tensors a backend receives.

The offline planner (``BatchPolicy.plan``) sorts by length and cuts; the server's batcher, which sees rows one at
a time in arrival order, asks ``BatchPolicy.fits`` before each row joins a batch. Both apply the same rule.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BatchPolicy",
    "DEFAULT_ENCODE_POLICY",
    "DEFAULT_EMBED_POLICY",
    "DEFAULT_SERVER_POLICY",
    "plan_batches",
    "pad_batch",
]


def _at_least_one(value) -> bool:
    """A whole number (an int or a numpy integer, not a bool) of at least 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class BatchPolicy:
    """At most ``max_rows`` rows per batch and, when ``max_tokens`` is set, at most that many padded tokens
    (rows x longest row). A batch always takes its first row, so a row longer than the budget runs alone."""

    max_rows: int
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        # batch_size is encode's and the embed job's name for max_rows; the server's is max_batch_rows.
        if not _at_least_one(self.max_rows):
            raise ValueError(
                f"batch_size must be at least 1 (rows per batch; the server's max_batch_rows), got {self.max_rows!r}"
            )
        if self.max_tokens is not None and not _at_least_one(self.max_tokens):
            raise ValueError(
                f"max_batch_tokens must be a positive number of tokens or None (no budget), got {self.max_tokens!r}"
            )
        object.__setattr__(self, "max_rows", int(self.max_rows))  # a numpy integer becomes an int
        if self.max_tokens is not None:
            object.__setattr__(self, "max_tokens", int(self.max_tokens))

    def fits(self, rows: int, longest: int, length: int) -> bool:
        """Whether a row of ``length`` tokens may join a batch of ``rows`` rows whose longest has ``longest`` tokens.

        An empty batch takes any row. ``fits(rows, longest, 0)`` is False once no row at all can join (the batch is
        full).
        """
        if rows == 0:
            return True
        if rows >= self.max_rows:
            return False
        return self.max_tokens is None or (rows + 1) * max(longest, length) <= self.max_tokens

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices per batch, longest first, so each batch pads to a similar length (ties keep input order)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            if not self.fits(len(current), longest, lengths[i]):
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, lengths[i])
        if current:
            batches.append(current)
        return batches


DEFAULT_ENCODE_POLICY = BatchPolicy(max_rows=32)  # Instructor.encode: the authors' batch_size, no token budget
DEFAULT_EMBED_POLICY = BatchPolicy(max_rows=32, max_tokens=16_384)  # fastinstructor embed / embed_corpus
DEFAULT_SERVER_POLICY = BatchPolicy(max_rows=128, max_tokens=16_384)  # fastinstructor serve


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """``BatchPolicy(batch_size, max_batch_tokens).plan(lengths)``, for callers that hold the two numbers."""
    return BatchPolicy(batch_size, max_batch_tokens).plan(lengths)


def pad_batch(ids: list[list[int]], pool_start: list[int], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-pad to the batch maximum: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``pool_start [B]``."""
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor(pool_start, dtype=torch.long)
