"""Cutting tokenized inputs into batches: one ``BatchPolicy`` (rows and tokens per batch at most), used by
``Instructor.encode``, the embed job and the server, and the two layouts a backend receives: ``pad_batch``
(``[B, L]`` with a mask, for the padded backends) and ``pack_batch`` (a ``PackedBatch``: every row's tokens
concatenated with ``cu_seqlens``, for a backend whose ``packed_input`` is set).

The offline planner (``BatchPolicy.plan``) sorts by length and cuts; the server's batcher, which sees rows one at
a time in arrival order, asks ``BatchPolicy.fits`` before each row joins a batch. Both apply the same rule.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BatchPolicy",
    "DEFAULT_ENCODE_POLICY",
    "DEFAULT_EMBED_POLICY",
    "DEFAULT_PACKED_POLICY",
    "DEFAULT_SERVER_POLICY",
    "PackedBatch",
    "default_policy",
    "pack_batch",
    "pack_padded",
    "plan_batches",
    "pad_batch",
]


def _at_least_one(value) -> bool:
    """A whole number (an int or a numpy integer, not a bool) of at least 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class BatchPolicy:
    """At most ``max_rows`` rows per batch and, when ``max_tokens`` is set, at most that many tokens: padded tokens
    (rows x longest row), or with ``packed=True`` real tokens (the sum of the rows' lengths: what a backend that
    takes packed batches pays). A batch always takes its first row, so a row longer than the budget runs alone."""

    max_rows: int
    max_tokens: int | None = None
    packed: bool = False

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
        if not isinstance(self.packed, bool):
            raise ValueError(f"packed must be True or False, got {self.packed!r}")
        object.__setattr__(self, "max_rows", int(self.max_rows))  # a numpy integer becomes an int
        if self.max_tokens is not None:
            object.__setattr__(self, "max_tokens", int(self.max_tokens))

    def fits(self, rows: int, longest: int, length: int, tokens: int | None = None) -> bool:
        """Whether a row of ``length`` tokens may join a batch of ``rows`` rows whose longest has ``longest`` tokens
        and whose rows hold ``tokens`` tokens in all (read only by a packed policy, which needs it).

        An empty batch takes any row. ``fits(rows, longest, 0, tokens)`` is False once no row at all can join (the
        batch is full; every row has at least one token, its ``</s>``).
        """
        if rows == 0:
            return True
        if rows >= self.max_rows:
            return False
        if self.max_tokens is None:
            return True
        if self.packed:
            if tokens is None:
                raise TypeError("a packed BatchPolicy counts real tokens: pass tokens=, the batch's sum of lengths")
            return tokens + max(length, 1) <= self.max_tokens
        return (rows + 1) * max(longest, length) <= self.max_tokens

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices per batch, longest first, so each batch pads to a similar length (ties keep input order)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        longest = tokens = 0
        for i in order:
            if not self.fits(len(current), longest, lengths[i], tokens):
                batches.append(current)
                current, longest, tokens = [], 0, 0
            current.append(i)
            longest = max(longest, lengths[i])
            tokens += lengths[i]
        if current:
            batches.append(current)
        return batches


DEFAULT_ENCODE_POLICY = BatchPolicy(max_rows=32)  # Instructor.encode: the authors' batch_size, no token budget
DEFAULT_EMBED_POLICY = BatchPolicy(max_rows=32, max_tokens=16_384)  # fastinstructor embed / embed_corpus
DEFAULT_SERVER_POLICY = BatchPolicy(max_rows=128, max_tokens=16_384)  # fastinstructor serve
# Instructor.encode on a backend that takes packed batches (the triton backend on CUDA): padding costs it nothing,
# so the budget counts real tokens. Conservative values, to be tuned on the device: the first H200 run
# (../shared/measurements/2026-11-30-h200/) measured its forward on 65,536-token batches.
DEFAULT_PACKED_POLICY = BatchPolicy(max_rows=1024, max_tokens=65_536, packed=True)


def default_policy(large_batches: bool) -> BatchPolicy:
    """``encode``'s policy when the caller names none: ``DEFAULT_PACKED_POLICY`` for a backend with
    ``large_batches`` (the triton backend: a GPU), else ``DEFAULT_ENCODE_POLICY``."""
    return DEFAULT_PACKED_POLICY if large_batches else DEFAULT_ENCODE_POLICY


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """``BatchPolicy(batch_size, max_batch_tokens).plan(lengths)``, for callers that hold the two numbers."""
    return BatchPolicy(batch_size, max_batch_tokens).plan(lengths)


@dataclass(frozen=True)
class PackedBatch:
    """One batch without padding, what a backend with ``packed_input`` receives: row ``b``'s tokens are
    ``input_ids[cu_seqlens[b]:cu_seqlens[b + 1]]``. ``max_len`` is known on the host, so the backend never has
    to synchronize with the device to learn it."""

    input_ids: torch.Tensor  # int64 [T]: every row's tokens, concatenated in batch order
    cu_seqlens: torch.Tensor  # int32 [B + 1]: 0, then the running sum of the rows' lengths
    pool_start: torch.Tensor  # int64 [B]: each row's first pooled position
    max_len: int  # the longest row's length

    @property
    def rows(self) -> int:
        return self.pool_start.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[0]

    def split(self, max_tokens: int) -> list[PackedBatch]:
        """The batch as ``ceil(tokens / max_tokens)`` consecutive batches of whole rows and about equal token
        counts (each cut at the row boundary nearest its equal share, so a part may pass ``max_tokens`` by less
        than a row), or ``[self]`` when it fits. Host tensors: a backend on the CPU calls it."""
        parts = -(-self.tokens // max_tokens)
        if parts <= 1:
            return [self]
        cu = self.cu_seqlens.numpy().astype(np.int64)
        shares = np.arange(1, parts) * self.tokens / parts
        right = np.searchsorted(cu, shares)  # cu[right - 1] < share <= cu[right]
        nearest = np.where(shares - cu[right - 1] < cu[right] - shares, right - 1, right)
        bounds = [0, *np.unique(np.clip(nearest, 1, self.rows - 1)).tolist(), self.rows]
        out = []
        for first, last in itertools.pairwise(bounds):
            lo, hi = int(cu[first]), int(cu[last])
            part_cu = torch.from_numpy(cu[first : last + 1] - lo).to(self.cu_seqlens.dtype)
            max_len = int(np.diff(cu[first : last + 1]).max())
            out.append(PackedBatch(self.input_ids[lo:hi], part_cu, self.pool_start[first:last], max_len))
        return out

    def filled_to(self, tokens: int) -> PackedBatch:
        """The batch with one more row, of ``tokens - self.tokens`` pad tokens (id 0), so that it holds exactly
        ``tokens`` tokens; ``self`` when it already does. Every op of a forward treats rows apart, so the real rows'
        embeddings are the first ``self.rows`` of the filled batch's. Host tensors."""
        fill = tokens - self.tokens
        if fill < 0:
            raise ValueError(f"a batch of {self.tokens} tokens cannot be filled to {tokens}")
        if fill == 0:
            return self
        return PackedBatch(
            torch.cat([self.input_ids, self.input_ids.new_zeros(fill)]),
            torch.cat([self.cu_seqlens, self.cu_seqlens[-1:] + fill]),
            torch.cat([self.pool_start, self.pool_start.new_zeros(1)]),
            max(self.max_len, fill),
        )


def _pinned(t: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """``t`` in page-locked memory when asked and CUDA is there to use it (a no-op on a CPU-only machine)."""
    return t.pin_memory() if pin_memory and torch.cuda.is_available() else t


def _rows(ids: Sequence[Sequence[int]], pool_start: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows' lengths, all their tokens concatenated and their pooling starts, as int64 arrays, without a
    Python loop over tensors."""
    if not len(ids) or len(ids) != len(pool_start):
        raise ValueError(
            f"a batch needs at least one row and one pool_start per row, got {len(ids)} and {len(pool_start)}"
        )
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return lengths, flat, np.array(pool_start, dtype=np.int64)


def pack_batch(ids: Sequence[Sequence[int]], pool_start: Sequence[int], pin_memory: bool = False) -> PackedBatch:
    """Concatenate the rows' token ids (no padding): ``input_ids [T]``, ``cu_seqlens [B + 1]``, ``pool_start [B]``
    and ``max_len``. ``pin_memory=True`` puts the tensors in page-locked memory when CUDA is available, so the
    backend's ``non_blocking`` copies overlap; it does nothing on a machine without CUDA."""
    lengths, flat, starts = _rows(ids, pool_start)
    cu = np.zeros(len(ids) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    return PackedBatch(
        _pinned(torch.from_numpy(flat), pin_memory),
        _pinned(torch.from_numpy(cu), pin_memory),
        _pinned(torch.from_numpy(starts), pin_memory),
        int(lengths.max()),
    )


def pad_batch(
    ids: Sequence[Sequence[int]], pool_start: Sequence[int], pad_id: int = 0, pin_memory: bool = False
) -> tuple[torch.Tensor, ...]:
    """Right-pad to the batch maximum: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``pool_start [B]`` (int64;
    in page-locked memory with ``pin_memory=True`` where CUDA is available)."""
    lengths, flat, starts = _rows(ids, pool_start)
    mask = np.arange(int(lengths.max())) < lengths[:, None]  # [B, L]: each row's first len(row) positions
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    input_ids[mask] = flat  # a boolean mask assigns in row-major order: row by row, left to right
    tensors = (input_ids, mask.astype(np.int64), starts)
    return tuple(_pinned(torch.from_numpy(t), pin_memory) for t in tensors)


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> PackedBatch:
    """A right-padded batch (``pad_batch``'s layout) as a ``PackedBatch``, on the tensors' device. On a CUDA
    tensor, learning ``max_len`` synchronizes with the device: ``pack_batch`` from the token ids does not."""
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return PackedBatch(input_ids[keep].long(), cu, pool_start.long(), int(lengths.max()))
