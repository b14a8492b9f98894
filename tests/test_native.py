"""The native CPU ops (csrc/, issue 16) against their references in t5.py, their PyTorch fallbacks, the build that
setup.py drives, and the cpu backend's packed forward that uses them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRECISIONS_HERE

import fastinstructor
from fastinstructor import native
from fastinstructor.batching import BatchPolicy, pack_batch, pad_batch
from fastinstructor.hardware import VNNI, cpu_flags, cpu_model
from fastinstructor.t5 import (
    position_bias_matrix,
    quantize_rows_ref,
    rms_norm_quantized_ref,
    rms_norm_ref,
    varlen_attention_ref,
)

ROOT = Path(__file__).resolve().parent.parent
BUILT = native.availability()[0]
needs_native = pytest.mark.skipif(not BUILT, reason=f"the native op is not here: {native.availability()[1]}")


def packed_inputs(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    tokens = int(cu[-1])
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=g).mul(0.3).to(dtype) for _ in range(3))
    table = torch.randn(32, heads, generator=g).mul(2)
    return q, k, v, cu, position_bias_matrix(table, max(lengths), 128)


@needs_native
@pytest.mark.parametrize(
    "lengths", [[1], [7], [600], [1, 7, 33, 128, 600, 70, 2], [5] * 40 + [300], list(range(1, 30))]
)
@pytest.mark.parametrize("heads, head_dim", [(4, 48), (3, 20), (2, 64), (3, 41)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_op_equals_the_reference(lengths, heads, head_dim, dtype):
    """float32 to 1e-5; bfloat16 to its tolerance, on whichever kernel attends it here (brgemm_attend: keys padded
    to 32, query blocks of 16 or 32 rows, an odd head dim's last pair completed by a zero)."""
    q, k, v, cu, bias = packed_inputs(lengths, heads, head_dim, dtype, seed=len(lengths) + head_dim)
    out = torch.ops.fastinstructor.varlen_attention(q, k, v, cu, bias)
    expected = varlen_attention_ref(q.float(), k.float(), v.float(), cu, bias)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@needs_native
def test_bfloat16_attention_runs_on_brgemm_where_the_cpu_has_avx512_bf16_and_no_amx():
    """The kernel that attends bfloat16 follows the CPU, and the report names it: brgemm_attend with avx512_bf16 and
    no AMX (where ATen's kernel runs its products on cpublas::gemm), ATen's fused attention elsewhere."""
    flags = cpu_flags()
    runs = "avx512_bf16" in flags and "amx_bf16" not in flags
    assert torch.ops.fastinstructor.brgemm_attention_runs() == runs
    kernel = "oneDNN brgemm" if runs else "ATen's fused attention"
    assert native.availability()[1].endswith(f"; bfloat16 attention on {kernel})")


@needs_native
def test_the_native_op_in_bfloat16_and_on_views():
    """bfloat16 in and out (float32 inside), on q, k, v as the backend passes them: views of one [T, 3, H, D]."""
    g = torch.Generator().manual_seed(3)
    lengths = [3, 64, 200, 1]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int64)
    qkv = torch.randn(int(cu[-1]), 3, 4, 40, generator=g).mul(0.3).bfloat16()
    q, k, v = qkv.unbind(1)
    bias = position_bias_matrix(torch.randn(32, 4, generator=g), 200, 128)
    out = native.varlen_attention(q, k, v, cu, bias)
    assert out.dtype == torch.bfloat16
    expected = varlen_attention_ref(q.float(), k.float(), v.float(), cu, bias)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@needs_native
@pytest.mark.parametrize("covered_by", ["the longest length", "it rounded up to 16", "it + 15", "more"])
def test_the_native_op_attends_bfloat16_sequences_as_multiples_of_16(covered_by):
    """A bfloat16 sequence is attended as its length rounded up to 16 where the bias covers the longest length + 15
    and the batch has the rows (the view runs into the next sequence's tokens, their keys masked by the -inf
    columns of the bias, the op's copy of it or the caller's): the same result as the reference, whatever the bias
    covers, the last sequence included (its padded view would run past the batch)."""
    lengths = [46, 1, 17, 16, 33, 63, 5]
    q, k, v, cu, _ = packed_inputs(lengths, 3, 40, torch.bfloat16, seed=7)
    table = torch.randn(32, 3, generator=torch.Generator().manual_seed(8))
    cover = {"the longest length": 63, "it rounded up to 16": 64, "it + 15": 78, "more": 100}[covered_by]
    out = native.varlen_attention(q, k, v, cu, position_bias_matrix(table, cover, 128))
    expected = varlen_attention_ref(q.float(), k.float(), v.float(), cu, position_bias_matrix(table, 63, 128))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    # The bias given in bfloat16 with its columns from the longest length on at -inf (the cpu backend's, made once
    # per batch), which the op then uses as it is: the same result to the bit, the fallback's too.
    masked = position_bias_matrix(table, cover, 128).to(torch.bfloat16)
    masked[:, :, 63:] = float("-inf")
    assert torch.equal(native.varlen_attention(q, k, v, cu, masked), out)
    unmasked = position_bias_matrix(table, cover, 128).to(torch.bfloat16)
    assert torch.equal(native.varlen_attention(q, k, v, cu, unmasked), out)  # the op masks its copy
    reference = varlen_attention_ref(q, k, v, cu, position_bias_matrix(table, cover, 128).to(torch.bfloat16))
    assert torch.equal(varlen_attention_ref(q, k, v, cu, masked), reference)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_op_reads_q_k_v_scaled_per_token(dtype):
    """With x_scale (the int8 qkv product's per-token scale), the op attends q, k and v as x * x_scale[:, None, None]
    rounded to their dtype: the same result, to the bit, as attending inputs scaled beforehand, bfloat16 sequences
    padded to 16 rows included (their padded rows are scaled too)."""
    g = torch.Generator().manual_seed(5)
    lengths = [46, 1, 17, 16, 33, 63, 5]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int64)
    qkv = torch.randn(int(cu[-1]), 3, 3, 40, generator=g).mul(0.3).to(dtype)
    x_scale = torch.rand(int(cu[-1]), generator=g).add(0.5)
    bias = position_bias_matrix(torch.randn(32, 3, generator=g), 63 + 15, 128).to(dtype)
    scaled = (qkv.float() * x_scale[:, None, None, None]).to(dtype).unbind(1)
    out = native.varlen_attention(*qkv.unbind(1), cu, bias, x_scale)
    assert torch.equal(out, native.varlen_attention(*scaled, cu, bias))
    torch.testing.assert_close(out.float(), varlen_attention_ref(*(x.float() for x in scaled), cu, bias.float()),
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)  # fmt: skip


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[46, 1, 17, 16, 33, 63, 5], [300, 3, 9], [1]])
def test_the_quantized_native_op_equals_the_op_then_the_quantization(dtype, lengths):
    """varlen_attention_quantized: the output's rows quantized as the tasks write them (those of a sequence split
    over head groups, [300] among short ones, once every task is done), the same to the bit as varlen_attention
    followed by the quantization of its rows; with x_scale too; and the fallback's the same maths."""
    q, k, v, cu, _ = packed_inputs(lengths, 4, 24, dtype, seed=sum(lengths))
    bias = position_bias_matrix(torch.randn(32, 4, generator=torch.Generator().manual_seed(2)), max(lengths) + 15, 128)
    x_scale = torch.rand(q.shape[0], generator=torch.Generator().manual_seed(3)).add(0.5)
    for scale in (None, x_scale):
        out = native.varlen_attention(q, k, v, cu, bias.to(dtype), scale)
        expected = quantize_rows_ref(out.reshape(out.shape[0], -1), torch.int8)
        got = native.varlen_attention_quantized(q, k, v, cu, bias.to(dtype), scale)
        assert got[0].shape == (q.shape[0], 4 * 24) and got[0].dtype == torch.int8
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_native
def test_the_native_op_names_bad_input():
    q, k, v, cu, bias = packed_inputs([5, 6], 2, 16, torch.float32)
    op = torch.ops.fastinstructor.varlen_attention
    with pytest.raises(RuntimeError, match=r"q, k, v must be \[T, H, D\] of one shape"):
        op(q, k[:-1], v, cu, bias)
    with pytest.raises(RuntimeError, match="must share a float32 or bfloat16 dtype"):
        op(q.half(), k.half(), v.half(), cu, bias)
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to T = 11"):
        op(q, k, v, torch.tensor([0, 5, 10], dtype=torch.int32), bias)
    with pytest.raises(RuntimeError, match=r"x_scale must be \[11\]"):
        op(q, k, v, cu, bias, torch.ones(10))
    with pytest.raises(RuntimeError, match="with x_scale, q, k and v must be contiguous in their last dimension"):
        op(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu, bias, torch.ones(11))
    with pytest.raises(RuntimeError, match="sequence 0 has 11 tokens; position_bias covers 6"):
        op(q, k, v, torch.tensor([0, 11], dtype=torch.int32), bias)
    with pytest.raises(RuntimeError, match=r"position_bias must be \[2, Lmax, Lmax\]"):
        op(q, k, v, cu, bias[:1])


def rows(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).mul(3).to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_the_native_rms_norm_equals_the_reference(dtype, with_residual, out_dtype, with_scale):
    """Odd widths and row counts; the residual stream is updated in place; x may carry a per-row scale."""
    x, weight = rows((37, 200), dtype, 1), rows((200,), torch.float32, 2).abs()
    residual = rows((37, 200), torch.float32, 3) if with_residual else None
    x_scale = rows((37,), torch.float32, 4).abs() if with_scale else None
    scaled = x if x_scale is None else x.float() * x_scale[:, None]
    y_ref, s_ref = rms_norm_ref(scaled, weight, 1e-6, residual, out_dtype)
    given = None if residual is None else residual.clone()
    y, s = native.rms_norm(x, weight, 1e-6, given, out_dtype, x_scale)
    assert y.dtype == out_dtype and y.shape == x.shape
    tolerance = 1e-5 if out_dtype == torch.float32 else 1e-2  # one bfloat16 rounding apart at most
    torch.testing.assert_close(y.float(), y_ref.float(), atol=tolerance, rtol=tolerance)
    if residual is None:
        assert s is None
    else:
        assert s is given  # in place
        torch.testing.assert_close(s, s_ref, atol=1e-6, rtol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_the_native_quantizations_equal_the_references(dtype, with_scale):
    x = rows((53, 300), dtype, 5)
    x_scale = rows((53,), torch.float32, 6).abs() if with_scale else None
    scaled = x if x_scale is None else x.float() * x_scale[:, None]
    for relu in (False, True):
        q, scale = native.quantize_rows(x, relu, x_scale)
        q_ref, scale_ref = quantize_rows_ref(scaled, torch.int8, relu)
        assert q.dtype == torch.int8 and torch.equal(q, q_ref)  # the same arithmetic, rounding included
        torch.testing.assert_close(scale, scale_ref, atol=0, rtol=1e-6)
    weight, residual = rows((300,), torch.float32, 7).abs(), rows((53, 300), torch.float32, 8)
    (q, scale), s = native.rms_norm_quantized(x, weight, 1e-6, residual.clone(), x_scale)
    (q_ref, scale_ref), s_ref = rms_norm_quantized_ref(scaled, weight, 1e-6, residual)
    # The norm's float32 sums may differ in their last bit, which moves a value at a rounding boundary by one step.
    assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-3
    torch.testing.assert_close(scale, scale_ref, atol=0, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-6, rtol=1e-6)


@needs_native
def test_the_native_row_ops_name_bad_input():
    x, weight = rows((4, 8), torch.float32, 0), torch.ones(8)
    ops = torch.ops.fastinstructor
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \[8\]"):
        ops.rms_norm(x, torch.ones(7), 1e-6, None, None, None)
    with pytest.raises(RuntimeError, match=r"rms_norm: x must be \[T, D\]"):
        ops.rms_norm(x[0], weight, 1e-6, None, None, None)
    with pytest.raises(RuntimeError, match="rms_norm_quantized: residual must be a contiguous float32"):
        ops.rms_norm_quantized(x, weight, 1e-6, x.bfloat16(), None)
    with pytest.raises(RuntimeError, match="quantize_rows: x must be float32 or bfloat16"):
        ops.quantize_rows(x.half(), False, None)
    with pytest.raises(RuntimeError, match=r"quantize_rows: x_scale must be \[4\]"):
        ops.quantize_rows(x, False, torch.ones(3))


def test_7_bit_weights_use_63_levels_a_side():
    """``reduce_range``: the per-row scale is amax / 63, every value within half a step, the extremes at +-63."""
    w = rows((16, 300), torch.float32, 5)
    q, scale = quantize_rows_ref(w, reduce_range=True)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).eq(63).all()
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 63)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="reduce_range is for int8"):
        quantize_rows_ref(w, torch.float8_e4m3fn, reduce_range=True)


def test_the_int8_product_equals_the_dequantized_one():
    """The cpu backend's int8 projection: oneDNN's product of the quantized operands, scaled back, with the ReLU,
    against the same quantized operands multiplied in float32, the activations' scale left to the caller. At
    base's width, where 8-bit weights saturate a product on a CPU without VNNI (in 2-4% of its elements on an
    AVX2-only AMD EPYC): there the weights are in 7 bits, and fewer than FEW_TOKENS rows run on FBGEMM, whose
    output must equal oneDNN's to the bit. The input goes in as s8 (with AMX) or as u8 with zero point 128
    (elsewhere: an s8 one runs oneDNN's reference kernel there): both give the same output to the bit."""
    from fastinstructor.backends.cpu import Int8Linear, _fbgemm_available

    if not Int8Linear.available():
        pytest.skip("this torch build has no oneDNN int8 linear: the cpu backend offers no int8 here")
    weight = rows((80, 768), torch.float32, 12).mul(0.1)
    for tokens in (45, Int8Linear.FEW_TOKENS + 3):
        x = rows((tokens, 768), torch.float32, 11)
        xq, x_scale = quantize_rows_ref(x)
        for activation in ("none", "relu"):
            linear = Int8Linear(weight, activation, torch.float32)
            assert linear.reduce_range == (not VNNI & cpu_flags())
            assert (linear.few_tokens_packed is not None) == (linear.reduce_range and _fbgemm_available())
            wq, w_scale = quantize_rows_ref(weight, reduce_range=linear.reduce_range)
            assert wq.abs().max() == (63 if linear.reduce_range else 127)
            expected = (xq.float() @ wq.float().t()) * w_scale[None, :] * x_scale[:, None]
            y, scale = linear((xq, x_scale))
            assert scale is x_scale
            torch.testing.assert_close(y * scale[:, None], expected.relu() if activation == "relu" else expected,
                                       atol=1e-4, rtol=1e-5)  # fmt: skip
            if linear.few_tokens_packed is not None:
                linear.few_tokens_packed = None  # the same rows on oneDNN
                assert torch.equal(linear((xq, x_scale))[0], y)
            assert linear.input_zero_point == (0 if "amx_int8" in cpu_flags() else 128)
            if not linear.reduce_range:  # an s8 input of 8-bit weights, as with AMX, equals the u8 one
                linear.input_zero_point = 128 - linear.input_zero_point
                assert torch.equal(linear((xq, x_scale))[0], y)


@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_the_cpu_backends_products_run_no_onednn_reference_kernel(tiny_model, precision):
    """Each oneDNN product the cpu backend runs on this CPU is one of its fast kernels, never its reference one
    (``ref*`` in ONEDNN_VERBOSE's implementation column): with an s8 input, the int8 products of an AMD EPYC with
    AVX-512 VNNI ran ``ref_int8``, 100-4,100x slower and the same output, so no other test saw it."""
    code = (
        "import sys, fastinstructor\n"
        "model = fastinstructor.load(sys.argv[1], backend='cpu', precision=sys.argv[2])\n"
        "model.encode([['Represent the text: ', 'a few words'], ['Represent: ', 'word ' * 40]] * 2)\n"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(tiny_model), precision], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    # onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,...
    products = [line.split(",")[5:7] for line in run.stdout.splitlines() if ",primitive,exec,cpu," in line]
    products = [(kind, impl) for kind, impl in products if kind in ("matmul", "inner_product", "convolution")]
    assert products, f"no oneDNN product logged for cpu/{precision}: {run.stdout[-2000:]}"
    slow = sorted({f"{kind} {impl}" for kind, impl in products if impl.startswith("ref")})
    assert not slow, f"cpu/{precision} ran oneDNN's reference kernel on {cpu_model()}: {slow}"


def test_the_fallback_runs_the_reference(monkeypatch):
    """With the library turned off (or never built), the same call runs t5.varlen_attention_ref."""
    monkeypatch.setenv("FASTINSTRUCTOR_NATIVE", "0")
    native.availability.cache_clear()
    try:
        assert native.availability() == (False, "turned off by FASTINSTRUCTOR_NATIVE=0: PyTorch fallback")
        q, k, v, cu, bias = packed_inputs([3, 9], 2, 16, torch.float32)
        torch.testing.assert_close(native.varlen_attention(q, k, v, cu, bias), varlen_attention_ref(q, k, v, cu, bias))
        scale = torch.rand(q.shape[0]).add(0.5)
        scaled = [x * scale[:, None, None] for x in (q, k, v)]
        assert torch.equal(native.varlen_attention(q, k, v, cu, bias, scale), varlen_attention_ref(*scaled, cu, bias))
        expected = quantize_rows_ref(varlen_attention_ref(*scaled, cu, bias).flatten(1), torch.int8)
        got = native.varlen_attention_quantized(q, k, v, cu, bias, scale)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        x, weight, residual, x_scale = rows((5, 12), torch.float32, 1), torch.ones(12), torch.ones(5, 12), torch.ones(5)
        scaled = x * x_scale[:, None]
        y, s = native.rms_norm(x, weight, 1e-6, residual, None, x_scale)
        y_ref, s_ref = rms_norm_ref(scaled, weight, 1e-6, residual)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        assert torch.equal(native.quantize_rows(x, True)[0], quantize_rows_ref(x, torch.int8, True)[0])
    finally:
        monkeypatch.delenv("FASTINSTRUCTOR_NATIVE")
        native.availability.cache_clear()


@pytest.mark.skipif(
    shutil.which("cmake") is None or not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="no CMake or C++ compiler here: the install builds no native op, and the fallback runs",
)
def test_the_install_built_the_native_op():
    """`make setup` (so `make test` from a clean clone) builds the library wherever CMake and a compiler exist."""
    assert BUILT, native.availability()[1]
    assert native.library_path().parent == Path(native.__file__).parent


@needs_native
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread here: nothing to run in parallel")
def test_the_native_ops_run_on_torchs_threads():
    """The ops' loops (at::parallel_for, an OpenMP region in torch's Linux wheels) use every torch thread: built
    without -fopenmp they ran on one, whatever the report said (rms_norm 1.9x slower on 2 cores)."""
    threads = torch.get_num_threads()
    assert torch.ops.fastinstructor.parallel_threads() == threads
    try:
        torch.set_num_threads(1)
        assert torch.ops.fastinstructor.parallel_threads() == 1
    finally:
        torch.set_num_threads(threads)
    native.availability.cache_clear()
    assert f"{threads} threads" in native.availability()[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastinstructor_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the build command; setup() runs only as __main__
    return module


def _build_command(module, tmp_path):
    from setuptools import Distribution

    dist = Distribution({"name": "fastinstructor", "ext_modules": [module.CMakeExtension("fastinstructor._native")]})
    command = module.CMakeBuild(dist)
    command.build_lib, command.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    command.ensure_finalized()
    return command


def test_an_install_without_a_compiler_goes_on_with_a_notice(tmp_path, monkeypatch, capsys):
    module = _setup_module()
    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    assert module.CMakeBuild._missing() == "no cmake: pip install cmake"
    command = _build_command(module, tmp_path)
    command.run()  # no exception: the install goes on
    assert "native CPU ops not built (no cmake: pip install cmake); the PyTorch fallback will run" in (
        capsys.readouterr().err
    )
    assert command.get_outputs() == []  # nothing to install that was not built


def test_a_failing_build_is_a_notice_not_a_failed_install(tmp_path, monkeypatch, capsys):
    module = _setup_module()
    monkeypatch.setattr(module.CMakeBuild, "_missing", staticmethod(lambda: None))

    def fail(self, ext):
        raise subprocess.CalledProcessError(1, ["cmake", "--build"])

    monkeypatch.setattr(module.CMakeBuild, "_build", fail)
    _build_command(module, tmp_path).run()
    assert "native CPU ops not built (the build failed: Command '['cmake', '--build']'" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_the_cpu_backend_runs_the_fallbacks_within_its_tolerance(tiny_model, real_pairs, precision, monkeypatch):
    """With the native ops turned off, the same backend runs every op's PyTorch reference: same tolerances."""
    from conftest import assert_parity

    monkeypatch.setenv("FASTINSTRUCTOR_NATIVE", "0")
    native.availability.cache_clear()
    try:
        model = fastinstructor.load(tiny_model, backend="cpu", precision=precision, parity_cache=False)
        assert "PyTorch fallback" in model.backend_report["native_ops"]
        reference = fastinstructor.load(tiny_model, backend="reference", precision="float32")
        assert_parity(model.encode(real_pairs[:24]), reference.encode(real_pairs[:24]), precision)
    finally:
        monkeypatch.delenv("FASTINSTRUCTOR_NATIVE")
        native.availability.cache_clear()


def test_the_cpu_forwards_token_counts_fall_in_few_shapes():
    """oneDNN compiles a product's kernels per shape: the forwards' token counts are rounded up to about 16 sizes
    per doubling, by at most 1/16 (8 tokens at the least)."""
    from fastinstructor.backends.cpu import shape_bucket

    buckets = {tokens: shape_bucket(tokens) for tokens in range(1, 4097)}
    assert all(tokens <= bucket <= tokens + max(7, tokens // 16) for tokens, bucket in buckets.items())
    assert len(set(buckets.values())) <= 100
    assert [shape_bucket(t) for t in (1, 20, 1000, 1024, 1100, 2730)] == [8, 24, 1024, 1024, 1152, 2816]


@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_the_packed_cpu_forward_equals_the_reference(tiny_model, real_pairs, precision):
    """The cpu backend (packed) against the float32 reference at its precision's tolerance, at batch sizes 1, 7, 32
    and under a token budget, on real text and the edge cases; ``embed`` of the same rows padded gives the same."""
    from conftest import assert_parity

    from fastinstructor.backends.cpu import CpuBackend, shape_bucket
    from fastinstructor.checkpoint import load_checkpoint

    reference = fastinstructor.load(tiny_model, backend="reference", precision="float32")
    pairs = real_pairs[:40] + [["", "x"], ["Represent:", ""], ["Represent the long one:", "word " * 700], "plain"]
    ids, starts, _ = reference.tokenizer(pairs)
    expected = reference.encode(pairs)
    backend = CpuBackend(load_checkpoint(tiny_model), precision=precision)
    lengths = [len(row) for row in ids]
    for policy in (BatchPolicy(1), BatchPolicy(7), BatchPolicy(32), BatchPolicy(64, 300, packed=True)):
        packed, padded = np.zeros_like(expected), np.zeros_like(expected)
        for rows in policy.plan(lengths):
            batch = ([ids[i] for i in rows], [starts[i] for i in rows])
            packed[rows] = backend.embed_packed(pack_batch(*batch)).numpy()
            padded[rows] = backend.embed(*pad_batch(*batch)).numpy()
        assert_parity(packed, expected, precision)
        assert np.abs(packed - padded).max() <= 1e-6, (policy, np.abs(packed - padded).max())
    # With fill_forwards (bfloat16's default) each forward is filled to its shape_bucket with a row of pad tokens:
    # the real rows' embeddings are those of the unfilled forward (bfloat16 and int8 to the rounding of attention
    # padded to 16 rows where it was not).
    assert backend.fill_forwards == (precision == "bfloat16")
    batch = pack_batch(ids, starts)
    assert shape_bucket(batch.tokens) > batch.tokens  # the fill is tested
    backend.fill_forwards = False
    unfilled = backend.embed_packed(batch).numpy()
    backend.fill_forwards = True
    whole = backend.embed_packed(batch).numpy()
    assert np.abs(whole - unfilled).max() <= (1e-6 if precision == "float32" else 5e-3), np.abs(whole - unfilled).max()
    # A batch larger than forward_tokens runs as several forwards (PackedBatch.split): the same embeddings.
    backend.forward_tokens = 50
    split = backend.embed_packed(pack_batch(ids, starts)).numpy()
    assert_parity(split, expected, precision)
    # float32 to rounding; bfloat16 and int8 differ by their own rounding where a sequence ends a forward (its
    # attention is not padded to a multiple of 16 there): 8e-4 and 1.3e-3 measured on tiny.
    assert np.abs(split - whole).max() <= (1e-6 if precision == "float32" else 5e-3), np.abs(split - whole).max()
