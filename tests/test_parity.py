"""The cpu backend against the float32 reference, with DESIGN section 5's tolerances; batch-size invariance."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_parity

import fastinstructor


@pytest.mark.parametrize("preset", ["tiny", "tiny-xl"])  # tiny-xl: heads * d_kv != d_model, like instructor-xl
def test_cpu_float32_matches_reference(make_model, real_pairs, preset):
    path = make_model(preset)
    expected = fastinstructor.load(path, backend="reference").encode(real_pairs)
    actual = fastinstructor.load(path, backend="cpu", precision="float32").encode(real_pairs)
    assert_parity(actual, expected, "float32")
    # The check above means something only if different inputs give clearly different embeddings.
    off_diagonal = (expected @ expected.T)[np.triu_indices(len(expected), 1)]
    assert np.median(off_diagonal) < 0.95


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_cpu_reduced_precision_on_base(make_model, real_pairs, precision):
    path = make_model("base")
    expected = fastinstructor.load(path, backend="reference").encode(real_pairs)
    actual = fastinstructor.load(path, backend="cpu", precision=precision).encode(real_pairs)
    assert_parity(actual, expected, precision)
    assert not np.allclose(actual, expected, atol=1e-6), f"{precision} gave float32 results: was it applied?"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_batch_size_does_not_change_results(tiny_model, real_pairs, backend):
    model = fastinstructor.load(tiny_model, backend=backend)
    base = model.encode(real_pairs, batch_size=1)
    for kwargs in ({"batch_size": 7}, {"batch_size": 32}, {"batch_size": 1000, "max_batch_tokens": 300}):
        np.testing.assert_allclose(model.encode(real_pairs, **kwargs), base, atol=1e-6, rtol=0, err_msg=str(kwargs))
    # Input order: embedding one row alone gives that row.
    for i in (0, 5, len(real_pairs) - 1):
        np.testing.assert_allclose(model.encode([real_pairs[i]]), base[i : i + 1], atol=1e-6, rtol=0)
