"""Triton kernels against their pure-torch references (docs/design.md section 7), in the interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
# Triton and the kernels were imported by conftest.py with TRITON_INTERPRET set (without CUDA).
pytest.importorskip("triton", reason="triton is not installed (pip install '.[dev]' brings it for these tests)")
import fastinstructor.kernels.attention  # noqa: E402, F401
import fastinstructor.kernels.matmul  # noqa: E402, F401
from fastinstructor.batching import pad_batch  # noqa: E402
from fastinstructor.kernels.pooling import masked_mean_pool, masked_mean_pool_ref  # noqa: E402
from fastinstructor.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The triton backend checks the flag at run time: set it for these tests only."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose, naming the first mismatching indices and any NaN/inf on failure."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float().cpu(), expected.float().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any() or not torch.isfinite(a).all():
        where = bad.nonzero()[:5].tolist()
        pytest.fail(
            f"{int(bad.sum())} mismatches, first at {where}: {a[bad][:5].tolist()} vs {e[bad][:5].tolist()}; "
            f"non-finite: {int((~torch.isfinite(a)).sum())}"
        )


@pytest.mark.parametrize("rows", [1, 7, 123])
@pytest.mark.parametrize("d", [64, 100, 768])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(rows, d, dtype, atol, rtol, with_residual):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    x = (torch.randn(rows, d, generator=g) * 3).to(DEVICE, dtype)
    weight = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype)
    residual = torch.randn(rows, d, generator=g).to(DEVICE, torch.float32) if with_residual else None
    y, s = rms_norm(x, weight, 1e-6, residual)
    y_ref, s_ref = rms_norm_ref(x, weight, 1e-6, residual)
    assert y.dtype == dtype
    assert_close(y, y_ref, atol, rtol)
    if with_residual:
        assert s.dtype == torch.float32
        assert_close(s, s_ref, 1e-6, 1e-6)
    else:
        assert s is None


def test_rms_norm_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected x \[T, D\] and weight \[D\]"):
        rms_norm(torch.randn(3, 8), torch.ones(7))
    with pytest.raises(ValueError, match="must be float32, float16 or bfloat16"):
        rms_norm(torch.ones(3, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.randn(3, 8), torch.ones(8), residual=torch.randn(2, 8))


def packed(lengths: list[int], d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), d, generator=g).to(DEVICE, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return hidden, cu


@pytest.mark.parametrize("lengths", [[1], [7], [33, 1, 128], [1, 7, 33, 128, 5, 17]])
@pytest.mark.parametrize("d", [64, 96, 200])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_masked_mean_pool(lengths, d, dtype, atol, rtol):
    hidden, cu = packed(lengths, d, dtype, seed=len(lengths) * 100 + d)
    # pool_start at 0, in the middle, at the last token (only </s>), and past the end (nothing pooled)
    choices = [0, lambda n: n // 2, lambda n: n - 1, lambda n: n + 3]
    starts = [c(n) if callable(c) else c for n, c in zip(lengths, (choices * 3)[: len(lengths)], strict=True)]
    pool_start = torch.tensor(starts, dtype=torch.int64, device=DEVICE)
    out = masked_mean_pool(hidden, cu, pool_start)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), d)
    assert_close(out, masked_mean_pool_ref(hidden, cu, pool_start), atol, rtol)


def test_masked_mean_pool_matches_the_padded_head():
    """The packed kernel gives what the padded pooling head of the PyTorch backends gives."""
    from fastinstructor.backends.base import pool_head

    lengths, d = [5, 1, 12], 32
    hidden, cu = packed(lengths, d, torch.float32, seed=7)
    pool_start = torch.tensor([2, 0, 11])
    padded = torch.zeros(len(lengths), max(lengths), d)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        padded[b, :n] = hidden[cu[b] : cu[b + 1]].cpu()
        mask[b, :n] = 1
    expected = pool_head(padded, mask, pool_start, None, normalize=False)
    assert_close(masked_mean_pool(hidden, cu, pool_start.to(DEVICE)), expected, 1e-6, 1e-6)


def test_masked_mean_pool_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected cu_seqlens \[B \+ 1\] and pool_start \[B\]"):
        masked_mean_pool(torch.randn(4, 8), torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="must be int32 or int64"):
        masked_mean_pool(torch.randn(4, 8), torch.tensor([0.0, 4.0]), torch.tensor([0]))


def attention_inputs(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, generator=g).mul(0.3).to(DEVICE, dtype) for _ in range(3))
    table = torch.randn(32, heads, generator=g).mul(2).to(DEVICE, torch.float32)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu, table


ATTENTION_DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 3e-3, 3e-3), (torch.bfloat16, 3e-2, 3e-2)]


@pytest.mark.parametrize("lengths", [[1], [7], [33, 1, 128], [1, 7, 33, 128, 70]])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype, atol, rtol", ATTENTION_DTYPES)
def test_t5_attention_packed(lengths, head_dim, dtype, atol, rtol):
    from fastinstructor.kernels.attention import t5_attention, t5_attention_ref

    q, k, v, cu, table = attention_inputs(lengths, 2, head_dim, dtype, seed=sum(lengths) + head_dim)
    out = t5_attention(q, k, v, cu, table)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, t5_attention_ref(q, k, v, cu, table), atol, rtol)


def test_t5_attention_finds_each_block_sequence_among_many():
    """Many sequences around small query blocks (16): the block -> sequence search, and a sequence's spare block,
    on lengths below, at and past multiples of the block."""
    from fastinstructor.kernels.attention import t5_attention, t5_attention_ref

    lengths = [16, 1, 15, 17, 32, 33, 2, 47, 48, 49, 3, 16, 64, 5, 31, 1, 1, 18, 100, 16, 7]
    q, k, v, cu, table = attention_inputs(lengths, 2, 32, torch.float32, seed=11)
    out = t5_attention(q, k, v, cu, table, tile={"BLOCK_M": 16, "BLOCK_N": 16})
    assert_close(out, t5_attention_ref(q, k, v, cu, table), 2e-5, 2e-5)


def test_t5_attention_beyond_512_tokens_and_every_bucket_boundary():
    """600 tokens: distances up to 599 (all 32 buckets, boundaries 16, 32, 64, 128) and several key blocks."""
    from fastinstructor.kernels.attention import t5_attention, t5_attention_ref

    q, k, v, cu, table = attention_inputs([600], 1, 64, torch.float32, seed=3)
    table = torch.arange(32, dtype=torch.float32, device=DEVICE)[:, None] * 3.0  # a wrong bucket shows at once
    assert_close(t5_attention(q, k, v, cu, table), t5_attention_ref(q, k, v, cu, table), 2e-5, 2e-5)


def test_t5_attention_padded_matches_the_materialized_bias():
    """The [B, H, L, D] entry point with a key padding mask, against SDPA with the bias materialized, as the
    cpu backend runs it."""
    from fastinstructor.kernels.attention import t5_attention_padded
    from fastinstructor.t5 import relative_position_bucket

    lengths, heads, head_dim, max_len = [5, 40, 1], 2, 64, 40
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(3, heads, max_len, head_dim, generator=g).mul(0.3) for _ in range(3))
    table = torch.randn(32, heads, generator=g)
    mask = torch.zeros(3, max_len, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    positions = torch.arange(max_len)
    bias = table[relative_position_bucket(positions[None, :] - positions[:, None], 32, 128)].permute(2, 0, 1)[None]
    additive = bias + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=1.0)
    out = t5_attention_padded(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), table.to(DEVICE))
    real = mask.bool()[:, None, :, None].expand_as(expected)
    assert_close(out.cpu()[real], expected[real], 2e-5, 2e-5)
    assert (out.cpu()[~real] == 0).all()


def test_t5_attention_rejects_bad_input():
    from fastinstructor.kernels.attention import t5_attention

    q, k, v, cu, table = attention_inputs([4], 2, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="share a float32/float16/bfloat16 dtype"):
        t5_attention(q, k.half(), v, cu, table)
    with pytest.raises(ValueError, match=r"bias_table must be \[num_buckets, 2\]"):
        t5_attention(q, k, v, cu, table[:, :1])
    with pytest.raises(ValueError, match="cu_seqlens must be int32/int64"):
        t5_attention(q, k, v, torch.tensor([0, 3], dtype=torch.int32), table)


def triton_embed(path, pairs, precision):
    """The triton backend's forward on ``pairs`` (batches of 8), without the dispatcher's calibration run:
    the interpreter is slow, so these tests feed it only what they compare."""
    import fastinstructor
    from fastinstructor.backends import TritonBackend
    from fastinstructor.checkpoint import load_checkpoint

    reference = fastinstructor.load(path, backend="reference", precision="float32")
    backend = TritonBackend(load_checkpoint(path), precision=precision, device=DEVICE)
    ids, starts, _ = reference.tokenizer(pairs)
    actual = torch.cat(
        [backend.embed(*pad_batch(ids[i : i + 8], starts[i : i + 8])).cpu() for i in range(0, len(ids), 8)]
    )
    return actual.numpy(), reference.encode(pairs)


@pytest.mark.parametrize(
    "preset, precision",
    [
        ("tiny", "float32"),
        ("tiny-xl", "float32"),
        ("tiny", "bfloat16"),
        ("tiny", "float16"),
        ("tiny", "int8"),
        ("tiny", "float8"),
    ],
)
def test_triton_backend_matches_reference(make_model, real_pairs, preset, precision):
    """The whole packed encoder with the kernels (interpreter on the CPU) against the float32 reference, in
    bfloat16 (the GPU default), float16, int8, float8 and float32, and with tiny-xl's heads x d_kv != d_model."""
    from conftest import assert_parity

    actual, expected = triton_embed(make_model(preset), real_pairs[:16], precision)  # two batches of 8
    assert_parity(actual, expected, precision)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_triton_backend_with_every_product_in_triton(make_model, real_pairs, monkeypatch, precision):
    """The same with the Triton matmul kernel for every projection, where the interpreter's tuner would run
    cuBLAS (its first candidate): both implementations a GPU may choose give the reference's embeddings."""
    from conftest import assert_parity

    from fastinstructor.kernels import tuning

    candidates = tuning.Site.candidates
    monkeypatch.setattr(
        tuning.Site, "candidates", lambda self, klass: [c for c in candidates(self, klass) if c != "cublas"]
    )
    actual, expected = triton_embed(make_model("tiny"), real_pairs[:8], precision)
    assert_parity(actual, expected, precision)


def test_triton_float16_keeps_the_ffn_output_in_float32(make_model, real_pairs, tmp_path):
    """T5's float16 overflow, provoked: FFN outputs scaled far past 65504 stay finite and match the reference."""
    import shutil

    from conftest import assert_parity
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(make_model("tiny"), tmp_path / "loud")
    weights = load_file(str(path / "model.safetensors"))
    for name in weights:
        if name.endswith("DenseReluDense.wo.weight"):
            weights[name] = weights[name] * 1e5
    save_file(weights, str(path / "model.safetensors"))
    hidden = torch.relu(torch.randn(4, 128)) @ weights["encoder.block.0.layer.1.DenseReluDense.wo.weight"].t()
    assert hidden.abs().max() > 65504  # the FFN output really leaves float16's range
    actual, expected = triton_embed(path, real_pairs[:8], "float16")
    assert_parity(actual, expected, "float16")


def test_triton_backend_availability(monkeypatch):
    from fastinstructor.backends import TritonBackend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = TritonBackend.availability()
    assert ok == torch.cuda.is_available() and (ok or "no CUDA device" in why)


@pytest.mark.parametrize("m, n, k", [(1, 64, 32), (7, 100, 48), (123, 130, 200)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_linear(m, n, k, dtype, atol, rtol, activation):
    from fastinstructor.kernels.matmul import linear, linear_ref

    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    out_dtype = torch.float32 if dtype == torch.float16 else None  # T5's wo under float16: float32 out
    y = linear(x, w, activation, out_dtype)
    assert y.dtype == (out_dtype or dtype)
    assert_close(y, linear_ref(x, w, activation, out_dtype), atol, rtol)
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("m, n, k", [(1, 64, 32), (7, 100, 48), (123, 130, 200)])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_linear_int8(m, n, k, activation):
    from fastinstructor.kernels.matmul import linear_int8, linear_int8_ref, linear_ref
    from fastinstructor.kernels.quantize import quantize_rows_ref as quantize_rows

    g = torch.Generator().manual_seed(m + n * k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    (xq, sx), (wq, sw) = quantize_rows(x), quantize_rows(w)
    y = linear_int8(xq.to(DEVICE), sx.to(DEVICE), wq.to(DEVICE), sw.to(DEVICE), activation)
    assert_close(y, linear_int8_ref(xq, sx, wq, sw, activation), 1e-4, 1e-5)  # integer products: exact
    exact = linear_ref(x, w, activation, torch.float32)  # and close to the float32 product
    cos = torch.nn.functional.cosine_similarity(y.cpu().flatten(), exact.flatten(), dim=0)
    assert cos > 0.999


def test_linear_rejects_bad_input():
    from fastinstructor.kernels.matmul import linear, linear_int8

    with pytest.raises(ValueError, match=r"expected x \[M, K\] and w \[N, K\]"):
        linear(torch.randn(3, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match="activation must be 'none' or 'relu'"):
        linear(torch.randn(3, 8), torch.randn(4, 8), "gelu")
    with pytest.raises(ValueError, match="must be int8"):
        linear_int8(torch.randn(3, 8), torch.ones(3), torch.randn(4, 8), torch.ones(4))


@pytest.mark.skipif(not INTERPRET, reason="a fix for the CPU interpreter; a GPU runs bfloat16 tl.dot natively")
def test_the_interpreter_multiplies_bfloat16_values_not_bit_patterns():
    """kernels._interpreter's fix, on its own: a bfloat16 tl.dot equals the float32 product of the same values."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a, b, c, N: tl.constexpr):
        r = tl.arange(0, N)
        offsets = r[:, None] * N + r[None, :]
        tl.store(c + offsets, tl.dot(tl.load(a + offsets), tl.load(b + offsets)))

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16)
    dot[(1,)](a, b, c, 16)
    assert_close(c, a.float() @ b.float(), 1e-5, 1e-5)


@pytest.mark.parametrize("index", range(4))
def test_t5_attention_every_tile_candidate(index):
    """Each tile bench/gpu_triton.py sweeps gives the same attention (lengths around and past its blocks)."""
    from fastinstructor.kernels.attention import TILE_CANDIDATES, t5_attention, t5_attention_ref

    tile = TILE_CANDIDATES[index]
    q, k, v, cu, table = attention_inputs([1, 130, 33], 2, 64, torch.bfloat16, seed=index)
    out = t5_attention(q, k, v, cu, table, tile=tile)
    assert_close(out, t5_attention_ref(q, k, v, cu, table), 3e-2, 3e-2)


@pytest.mark.parametrize("index", range(6))
def test_linear_every_tile_candidate(index):
    """Each matmul tile the GPU script sweeps, in bfloat16 with the ReLU and in int8, on sizes off its blocks."""
    from fastinstructor.kernels.matmul import TILE_CANDIDATES, linear, linear_int8, linear_int8_ref
    from fastinstructor.kernels.quantize import quantize_rows_ref as quantize_rows

    tile = TILE_CANDIDATES[index]
    g = torch.Generator().manual_seed(index)
    x, w = torch.randn(70, 96, generator=g), torch.randn(300, 96, generator=g) / 10
    half = linear(x.to(DEVICE, torch.bfloat16), w.to(DEVICE, torch.bfloat16), "relu", tile=tile)
    assert_close(half, torch.relu(x.bfloat16().float() @ w.bfloat16().float().t()), 2e-2, 2e-2)
    (xq, sx), (wq, sw) = quantize_rows(x), quantize_rows(w)
    y = linear_int8(xq.to(DEVICE), sx.to(DEVICE), wq.to(DEVICE), sw.to(DEVICE), tile=tile)
    assert_close(y, linear_int8_ref(xq, sx, wq, sw), 1e-4, 1e-5)


def test_tile_names_are_checked():
    from fastinstructor.kernels.matmul import linear

    with pytest.raises(ValueError, match=r"unknown tile settings \['BLOCK_Q'\]"):
        linear(torch.randn(3, 8), torch.randn(4, 8), tile={"BLOCK_Q": 16})
