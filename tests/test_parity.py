"""The cpu backend against the float32 reference, with docs/design.md section 5's tolerances; batch-size invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PRECISIONS_HERE, assert_parity, needs_cpu_bfloat16, ungated

import fastinstructor
from fastinstructor.backends.cpu import CpuBackend, Int8Linear, PackedLinear
from fastinstructor.checkpoint import load_checkpoint


# tiny-xl: heads * d_kv != d_model, like instructor-xl; base: oneDNN's blocking at real sizes.
@pytest.mark.parametrize("preset", ["tiny", "tiny-xl", "base"])
def test_cpu_float32_matches_reference(make_model, real_pairs, preset):
    path = make_model(preset)
    reference = fastinstructor.load(path, backend="reference")
    expected = reference.encode(real_pairs)
    actual = ungated(reference, CpuBackend(load_checkpoint(path), precision="float32")).encode(real_pairs)
    assert_parity(actual, expected, "float32")
    # The check above means something only if different inputs give clearly different embeddings.
    off_diagonal = (expected @ expected.T)[np.triu_indices(len(expected), 1)]
    assert np.median(off_diagonal) < 0.95


@pytest.mark.parametrize("precision", [pytest.param("bfloat16", marks=needs_cpu_bfloat16), "int8"])
def test_cpu_reduced_precision_on_base(make_model, real_pairs, precision):
    path = make_model("base")
    reference = fastinstructor.load(path, backend="reference")
    expected = reference.encode(real_pairs)
    actual = ungated(reference, CpuBackend(load_checkpoint(path), precision=precision)).encode(real_pairs)
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


@pytest.mark.skipif(not PackedLinear.available(), reason="this torch build has no oneDNN (mkldnn) linear")
@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 0.02, marks=needs_cpu_bfloat16)]
)
def test_packed_linear_matches_torch(dtype, atol):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64).to(dtype), torch.randn(3, 17, 64).to(dtype)  # a 3-d input, odd lengths
    expected = torch.nn.functional.linear(x.float(), weight.float())
    torch.testing.assert_close(PackedLinear(weight)(x).float(), expected, atol=atol, rtol=atol)
    torch.testing.assert_close(PackedLinear(weight, "relu")(x).float(), expected.relu(), atol=atol, rtol=atol)


@pytest.mark.skipif(not PackedLinear.available(), reason="this torch build has no oneDNN (mkldnn) linear")
@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_cpu_backend_packs_its_linears(tiny_model, precision):
    """The fast paths are the ones tested on their own: float32 and bfloat16 run on PackedLinear, int8 on
    Int8Linear (tests/test_native.py)."""
    layer = fastinstructor.load(tiny_model, backend="cpu", precision=precision).backend.encoder.layers[0]
    kind = Int8Linear if precision == "int8" else PackedLinear
    assert all(isinstance(p, kind) for p in (layer.qkv, layer.o, layer.wi, layer.wo))
