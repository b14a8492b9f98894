"""``BatchPolicy``: its rule, its checks, and the offline planner and the streaming check agreeing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fastinstructor.batching import (
    DEFAULT_EMBED_POLICY,
    DEFAULT_ENCODE_POLICY,
    DEFAULT_PACKED_POLICY,
    DEFAULT_SERVER_POLICY,
    BatchPolicy,
    default_policy,
    plan_batches,
)


def _cost(policy: BatchPolicy, lengths: list[int], rows: list[int]) -> int:
    """What the batch counts against ``max_tokens``: real tokens for a packed policy, else rows x longest."""
    if policy.packed:
        return sum(lengths[i] for i in rows)
    return len(rows) * max(lengths[i] for i in rows)


def test_the_rule():
    policy = BatchPolicy(max_rows=4, max_tokens=100)
    assert policy.fits(0, 0, 10_000)  # an empty batch takes any row, even one past the budget
    assert policy.fits(1, 50, 10) and policy.fits(1, 10, 50)  # 2 x 50 = 100: just fits
    assert not policy.fits(1, 50, 51) and not policy.fits(1, 51, 50)  # 2 x 51 > 100
    assert policy.fits(3, 25, 25) and not policy.fits(4, 1, 1)  # 4 rows at most
    assert not policy.fits(3, 34, 0)  # 4 x 34 > 100: full, no row of any length can join
    rows_only = BatchPolicy(max_rows=2)
    assert rows_only.fits(1, 10**9, 10**9) and not rows_only.fits(2, 1, 1)


def test_the_packed_rule_counts_real_tokens():
    policy = BatchPolicy(max_rows=4, max_tokens=100, packed=True)
    assert policy.fits(0, 0, 10_000, 0)  # an empty batch takes any row
    assert policy.fits(1, 90, 10, 90) and not policy.fits(1, 90, 11, 90)  # 90 + 10 = 100 fits, 101 does not
    assert policy.fits(2, 50, 50, 50)  # 3 x 50 padded would be 150; packed it is 100
    assert not policy.fits(4, 1, 1, 4)  # 4 rows at most
    assert not policy.fits(2, 60, 0, 100) and policy.fits(2, 60, 0, 99)  # full: not even a 1-token row joins
    with pytest.raises(TypeError, match="pass tokens="):
        policy.fits(1, 10, 10)
    assert BatchPolicy(max_rows=8, max_tokens=100, packed=True).plan([60, 50, 40, 30]) == [[0], [1, 2], [3]]
    assert BatchPolicy(max_rows=8, max_tokens=100, packed=True).plan([20, 50, 30]) == [[1, 2, 0]]  # 100 real
    assert BatchPolicy(max_rows=8, max_tokens=100).plan([20, 50, 30]) == [[1, 2], [0]]  # 3 x 50 padded > 100
    assert BatchPolicy(max_rows=8, max_tokens=10, packed=True).plan([50, 3]) == [[0], [1]]  # too long: alone


def test_the_plan_sorts_by_length_and_cuts_by_rows_and_tokens():
    lengths = [5, 40, 10, 40, 30, 1, 60]
    assert BatchPolicy(max_rows=3).plan(lengths) == [[6, 1, 3], [4, 2, 0], [5]]  # ties keep input order
    assert BatchPolicy(max_rows=8, max_tokens=100).plan(lengths) == [[6], [1, 3], [4, 2, 0], [5]]
    assert BatchPolicy(max_rows=8, max_tokens=10).plan([50, 3]) == [[0], [1]]  # too long for the budget: alone
    assert BatchPolicy(max_rows=8).plan([]) == []


@pytest.mark.parametrize(
    "rows, tokens, message",
    [
        (0, None, "batch_size must be at least 1"),
        (-3, 100, "batch_size must be at least 1"),
        (2.0, None, "batch_size must be at least 1"),
        (True, None, "batch_size must be at least 1"),
        ("32", None, "batch_size must be at least 1"),
        (32, 0, "max_batch_tokens must be a positive number of tokens or None"),
        (32, 1.5, "max_batch_tokens must be a positive number of tokens or None"),
    ],
)
def test_bad_limits_are_refused_once_with_their_names(rows, tokens, message):
    with pytest.raises(ValueError, match=message):
        BatchPolicy(rows, tokens, packed=True)
    with pytest.raises(ValueError, match=message):
        BatchPolicy(rows, tokens)
    with pytest.raises(ValueError, match=message):  # the same check behind the free function
        plan_batches([1, 2], rows, tokens)


def test_numpy_integers_are_taken_as_ints():
    policy = BatchPolicy(np.int64(8), np.int32(512))
    assert policy == BatchPolicy(8, 512) and type(policy.max_rows) is int and type(policy.max_tokens) is int


def test_the_named_defaults():
    assert DEFAULT_ENCODE_POLICY == BatchPolicy(32, None)
    assert DEFAULT_EMBED_POLICY == BatchPolicy(32, 16_384)
    assert DEFAULT_SERVER_POLICY == BatchPolicy(128, 16_384)
    assert DEFAULT_PACKED_POLICY == BatchPolicy(1024, 65_536, packed=True)
    assert default_policy(False) is DEFAULT_ENCODE_POLICY and default_policy(True) is DEFAULT_PACKED_POLICY
    with pytest.raises(ValueError, match="packed must be True or False"):
        BatchPolicy(8, 100, packed=1)


def _stream(policy: BatchPolicy, lengths: list[int]) -> list[list[int]]:
    """Batches as a streaming consumer forms them: rows in the given order, each asking ``fits``."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = tokens = 0
    for i, n in enumerate(lengths):
        if not policy.fits(len(current), longest, n, tokens):
            batches.append(current)
            current, longest, tokens = [], 0, 0
        current.append(i)
        longest = max(longest, n)
        tokens += n
    return batches + ([current] if current else [])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_the_planner_and_the_streaming_check_agree(seed, packed):
    rng = random.Random(seed)
    policy = BatchPolicy(rng.randint(1, 40), rng.choice([None, rng.randint(1, 4096)]), packed=packed)
    lengths = [rng.randint(1, 512) for _ in range(rng.randint(0, 300))]
    planned = policy.plan(lengths)
    assert sorted(i for rows in planned for i in rows) == list(range(len(lengths)))
    # The plan is the streaming rule applied to the rows sorted longest first, batch for batch.
    order = [i for rows in planned for i in rows]
    assert order == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    streamed = _stream(policy, [lengths[i] for i in order])
    assert [[order[j] for j in rows] for rows in streamed] == planned
    for rows, following in zip(planned, planned[1:] + [None], strict=True):
        assert len(rows) <= policy.max_rows
        assert len(rows) == 1 or policy.max_tokens is None or _cost(policy, lengths, rows) <= policy.max_tokens
        if following is not None:  # cut only where the next row did not fit
            tokens = sum(lengths[i] for i in rows)
            assert not policy.fits(len(rows), max(lengths[i] for i in rows), lengths[following[0]], tokens)


def test_plan_batches_is_the_policy():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    assert plan_batches(lengths, 16, 2048) == BatchPolicy(16, 2048).plan(lengths)
    assert plan_batches(lengths, 16) == BatchPolicy(16).plan(lengths)
