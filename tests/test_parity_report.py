"""fastinstructor.parity: the judge of every fast path must itself catch what it is meant to catch."""

import numpy as np
import pytest

from fastinstructor.parity import TOLERANCES, Tolerance, compare


def test_identical_embeddings_pass_every_tolerance():
    x = np.random.default_rng(0).standard_normal((7, 16))
    report = compare(x, x)
    assert report.min_cos == pytest.approx(1.0) and report.max_abs == 0
    assert all(not report.failures(t) for t in TOLERANCES.values())


def test_failures_name_the_rows():
    rng = np.random.default_rng(1)
    expected = rng.standard_normal((20, 16))
    actual = expected + 1e-4 * rng.standard_normal((20, 16))  # fine for int8/bf16, not for float32
    actual[13] = rng.standard_normal(16)  # one unrelated row
    report = compare(actual, expected)
    assert report.worst_rows[0] == 13
    assert any("min cosine" in p and "13:" in p for p in report.failures(TOLERANCES["int8"]))
    close = compare(expected + 1e-4 * rng.standard_normal((20, 16)), expected)
    assert not close.failures(TOLERANCES["bfloat16"])
    assert any("max abs difference" in p for p in close.failures(TOLERANCES["float32"]))


def test_nan_and_mean_cosine():
    expected = np.ones((4, 8))
    actual = expected.copy()
    actual[2, 3] = np.nan
    assert any("non-finite values in rows [2]" in p for p in compare(actual, expected).failures(TOLERANCES["int8"]))
    everywhere = compare(np.full_like(expected, np.nan), expected)  # a checkpoint with NaN weights, on the reference
    assert everywhere.non_finite_rows == (0, 1, 2, 3) and everywhere.max_abs_at == (0, 0)
    rotated = np.eye(8)[:4] * 0.9 + np.eye(8)[1:5] * 0.436  # cos ≈ 0.9 for every row: min passes, mean fails
    problems = compare(rotated, np.eye(8)[:4]).failures(Tolerance(min_cos=0.8, mean_cos=0.95))
    assert problems == [p for p in problems if "mean cosine" in p] and problems
    with pytest.raises(ValueError, match="same shape|one shape"):
        compare(np.ones((2, 3)), np.ones((3, 3)))
