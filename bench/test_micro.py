"""Micro-benchmarks of the hot CPU pieces of the pipeline, with pytest-benchmark.

Run from the repository root (a plain ``pytest`` does not collect bench/)::

    .venv/bin/python -m pytest bench/ --benchmark-only
    .venv/bin/python -m pytest bench/ --benchmark-only --benchmark-columns=min,median,mean,ops,rounds
    .venv/bin/python -m pytest bench/ --benchmark-only -k pool_head   # one group

Inputs (see bench/conftest.py): 256 real ``[instruction, text]`` pairs under four instructions, tokenized by
the random-weight ``tiny`` preset's tokenizer (a SentencePiece model trained on real text; its token counts
are close to the real models' for this text). What each group measures:

- ``tokenize``: ``model.tokenizer(pairs)`` (``PairTokenizer.__call__``: validation, joining, one batched
  fast-tokenizer call, instruction lengths) with the instruction-length cache warm, and with it cleared
  before every round (``instruction_length.cache_clear()``: 4 misses per call, one per instruction);
  ``instruction-length``: one lookup, cache hit vs miss.
- ``batching``: ``plan_batches`` (sort by length, cut by 32 rows, with and without a 2048-token budget), and
  ``pad_batch`` over every batch of those plans (the tensors the backend receives).
- ``pool-head``: ``fastinstructor.backends.base.pool_head``, the function the cpu backend calls after the
  encoder: instruction-masked mean pooling + Dense + L2 normalize, on base shapes (batch 32 x length 128 x
  d_model 768, Dense 768 -> 768), float32, under ``torch.inference_mode`` as in ``CpuBackend.embed``.
- ``attention-cpu``: packed attention at L = 64, 128 and 512 (base's 12 heads x 64, 4,096 tokens per call, float32
  and bfloat16, the latter only on a CPU with native bfloat16): the native op (``fastinstructor.native``,
  csrc/varlen_attention.cpp, with brgemm_attention.cpp for bfloat16; skipped with the reason when it is not
  built), its PyTorch fallback (``t5.varlen_attention_ref``, one sequence at a time), and ATen's fused attention
  (SDPA) over the same sequences as one padded ``[B, H, L, D]`` batch with the bias as its ``[B, H, L, L]`` mask.
- ``triton``: the Triton kernels (``fastinstructor.kernels``) need CUDA, and the CPU
  interpreter's timings are meaningless, so this group is skipped unless ``torch.cuda.is_available()`` and
  triton imports. Then it times the fused residual add +
  RMSNorm and the packed masked mean pooling on small CUDA tensors, synchronizing after each call.

The timings are per call of the function named in each test. On a shared machine whose load average is at or
above its core count, read the Min column: torch's multi-threaded ops (pool-head) then lose whole scheduler
slices waiting for a descheduled thread, and their medians jump by 4-20x between runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastinstructor.backends.base import pool_head
from fastinstructor.batching import pad_batch, plan_batches

BATCH_SIZE = 32
MAX_BATCH_TOKENS = 2048


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


NATIVE_SKIP_REASON = "the Triton kernels need CUDA (the CPU interpreter's timings are meaningless)"
HAVE_CUDA_TRITON = torch.cuda.is_available() and _triton_imports() and not os.environ.get("TRITON_INTERPRET")


# --- tokenize ---------------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="tokenize")
def test_tokenize_pairs_cached(benchmark, model, pairs):
    """256 pairs, instruction lengths already in the cache (the steady state of a long job)."""
    tokenizer = model.tokenizer
    tokenizer(pairs)  # fill the cache
    out = benchmark(tokenizer, pairs)
    assert len(out.ids) == len(pairs)
    assert tokenizer.instruction_length.cache_info().hits > 0


@pytest.mark.benchmark(group="tokenize")
def test_tokenize_pairs_cache_cleared(benchmark, model, pairs):
    """The same 256 pairs with the instruction-length cache cleared before every round (4 misses per call)."""
    tokenizer = model.tokenizer
    out = benchmark.pedantic(
        tokenizer, args=(pairs,), setup=tokenizer.instruction_length.cache_clear, rounds=40, warmup_rounds=2
    )
    assert len(out.ids) == len(pairs)
    assert tokenizer.instruction_length.cache_info().misses == len({p[0] for p in pairs})


@pytest.mark.benchmark(group="instruction-length")
def test_instruction_length_hit(benchmark, model, pairs):
    """One instruction-length lookup that hits the cache."""
    tokenizer = model.tokenizer
    instruction = pairs[0][0]
    expected = tokenizer.instruction_length(instruction)
    assert benchmark(tokenizer.instruction_length, instruction) == expected


@pytest.mark.benchmark(group="instruction-length")
def test_instruction_length_miss(benchmark, model, pairs):
    """One instruction-length lookup on a cleared cache: one fast-tokenizer call on the instruction."""
    tokenizer = model.tokenizer
    instruction = pairs[0][0]
    n = benchmark.pedantic(
        tokenizer.instruction_length,
        args=(instruction,),
        setup=tokenizer.instruction_length.cache_clear,
        rounds=200,
        warmup_rounds=5,
    )
    assert n > 0


# --- batching ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, MAX_BATCH_TOKENS], ids=["rows-only", f"budget-{MAX_BATCH_TOKENS}"])
@pytest.mark.benchmark(group="batching")
def test_plan_batches(benchmark, tokenized, budget):
    lengths = [len(row) for row in tokenized.ids]
    batches = benchmark(plan_batches, lengths, BATCH_SIZE, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))


@pytest.mark.parametrize("budget", [None, MAX_BATCH_TOKENS], ids=["rows-only", f"budget-{MAX_BATCH_TOKENS}"])
@pytest.mark.benchmark(group="batching")
def test_pad_batch_all(benchmark, tokenized, budget):
    """``pad_batch`` for every batch of the plan: 256 rows padded into tensors."""
    ids, starts = tokenized.ids, tokenized.pool_start
    batches = [
        ([ids[i] for i in rows], [starts[i] for i in rows])
        for rows in plan_batches([len(row) for row in ids], BATCH_SIZE, budget)
    ]

    def pad_all():
        return [pad_batch(batch_ids, batch_starts) for batch_ids, batch_starts in batches]

    padded = benchmark(pad_all)
    assert sum(t[0].shape[0] for t in padded) == len(ids)


# --- pool-head --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_head_inputs():
    """Base-shaped inputs: hidden [32, 128, 768], a ragged mask (lengths 24..128), instructions of 8..14 tokens,
    Dense [768, 768]."""
    gen = torch.Generator().manual_seed(0)
    batch, length, d_model, out_dim = 32, 128, 768, 768
    hidden = torch.randn(batch, length, d_model, generator=gen)
    lengths = torch.randint(24, length + 1, (batch,), generator=gen)
    lengths[0] = length
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    pool_start = torch.randint(8, 15, (batch,), generator=gen)
    dense_weight = torch.randn(out_dim, d_model, generator=gen) / d_model**0.5
    return hidden, attention_mask, pool_start, dense_weight


@pytest.mark.benchmark(group="pool-head")
def test_pool_head_base(benchmark, base_head_inputs):
    """Masked mean pooling + Dense + L2 normalize, as ``CpuBackend.embed`` runs it."""
    hidden, attention_mask, pool_start, dense_weight = base_head_inputs

    def run():
        with torch.inference_mode():
            return pool_head(hidden, attention_mask, pool_start, dense_weight, True)

    out = benchmark(run)
    assert out.shape == (hidden.shape[0], dense_weight.shape[0])
    assert torch.allclose(out.norm(dim=1), torch.ones(out.shape[0]), atol=1e-5)


@pytest.mark.benchmark(group="pool-head")
def test_pool_only_base(benchmark, base_head_inputs):
    """Masked mean pooling alone (no Dense, no normalize): the share of the head that is the reduction."""
    hidden, attention_mask, pool_start, _ = base_head_inputs

    def run():
        with torch.inference_mode():
            return pool_head(hidden, attention_mask, pool_start, None, False)

    out = benchmark(run)
    assert out.shape == (hidden.shape[0], hidden.shape[2])


# --- triton (CUDA only) -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_CUDA_TRITON, reason=NATIVE_SKIP_REASON)
@pytest.mark.benchmark(group="triton")
def test_triton_rms_norm_residual(benchmark):
    """Fused residual add + T5 RMSNorm on 4096 tokens x 768 (float32), one kernel launch, synchronized."""
    from fastinstructor.kernels.rms_norm import rms_norm, rms_norm_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 768, device="cuda", generator=gen)
    residual = torch.randn(4096, 768, device="cuda", generator=gen)
    weight = torch.rand(768, device="cuda", generator=gen) + 0.5

    def run():
        out = rms_norm(x, weight, 1e-6, residual)
        torch.cuda.synchronize()
        return out

    y, s = benchmark(run)
    y_ref, s_ref = rms_norm_ref(x, weight, 1e-6, residual)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref)


@pytest.mark.skipif(not HAVE_CUDA_TRITON, reason=NATIVE_SKIP_REASON)
@pytest.mark.benchmark(group="triton")
def test_triton_masked_mean_pool(benchmark):
    """Instruction-masked mean pooling over 32 packed sequences (24..128 tokens) x 768, synchronized."""
    from fastinstructor.kernels.pooling import masked_mean_pool, masked_mean_pool_ref

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(24, 129, (32,), generator=gen)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    pool_start = torch.randint(8, 15, (32,), generator=gen).cuda()
    hidden = torch.randn(int(lengths.sum()), 768, generator=gen).cuda()

    def run():
        out = masked_mean_pool(hidden, cu_seqlens, pool_start)
        torch.cuda.synchronize()
        return out

    out = benchmark(run)
    torch.testing.assert_close(out, masked_mean_pool_ref(hidden, cu_seqlens, pool_start), rtol=1e-4, atol=1e-4)


# --- attention-cpu ----------------------------------------------------------------------------------------------

ATTENTION_LENGTHS = [64, 128, 512]
ATTENTION_DTYPES = ["float32", "bfloat16"]  # names: pytest-benchmark keeps the params in its JSON


def _packed_attention_inputs(length: int, dtype_name: str):
    from fastinstructor.backends import CpuBackend
    from fastinstructor.hardware import probe
    from fastinstructor.t5 import position_bias_matrix

    dtype = getattr(torch, dtype_name)
    if dtype == torch.bfloat16 and (why := CpuBackend.unavailable("bfloat16", "cpu", probe())) is not None:
        pytest.skip(f"the cpu backend does not attend in bfloat16 here: {why}")
    gen = torch.Generator().manual_seed(length)
    batch, heads, head_dim = 4096 // length, 12, 64
    q, k, v = (torch.randn(batch * length, heads, head_dim, generator=gen).mul(0.3).to(dtype) for _ in range(3))
    cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    # In q's dtype, as the cpu backend passes it (made once per batch, read by every layer's call).
    bias = position_bias_matrix(torch.randn(32, heads, generator=gen), length, 128).to(dtype)
    return q, k, v, cu_seqlens, bias


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("length", ATTENTION_LENGTHS)
@pytest.mark.benchmark(group="attention-cpu")
def test_attention_native(benchmark, length, dtype):
    from fastinstructor import native
    from fastinstructor.t5 import varlen_attention_ref

    if not native.availability()[0]:
        pytest.skip(native.availability()[1])
    inputs = _packed_attention_inputs(length, dtype)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    with torch.inference_mode():
        out = benchmark(torch.ops.fastinstructor.varlen_attention, *inputs)
        expected = varlen_attention_ref(*(x.float() for x in inputs[:3]), *inputs[3:])
        torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("length", ATTENTION_LENGTHS)
@pytest.mark.benchmark(group="attention-cpu")
def test_attention_fallback(benchmark, length, dtype):
    from fastinstructor.t5 import varlen_attention_ref

    inputs = _packed_attention_inputs(length, dtype)
    with torch.inference_mode():
        benchmark(varlen_attention_ref, *inputs)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("length", ATTENTION_LENGTHS)
@pytest.mark.benchmark(group="attention-cpu")
def test_attention_padded_sdpa(benchmark, length, dtype):
    """ATen's fused attention on the same sequences as one batch: [B, H, L, D] and a [B, H, L, L] additive mask."""
    q, k, v, _, bias = _packed_attention_inputs(length, dtype)
    batch = q.shape[0] // length
    qp, kp, vp = (t.view(batch, length, 12, 64).transpose(1, 2) for t in (q, k, v))
    mask = bias[None].expand(batch, -1, -1, -1)
    with torch.inference_mode():
        benchmark(torch.nn.functional.scaled_dot_product_attention, qp, kp, vp, attn_mask=mask, scale=1.0)
