// One sequence's bfloat16 attention on oneDNN's batch-reduce GEMM kernels (brgemm, through ATen's cpublas): the
// varlen op's kernel for bfloat16 on a CPU with avx512_bf16 and no AMX. See brgemm_attention.cpp.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fastinstructor {

// A sequence's q, k or v: its first token's first head, and the strides (in elements) between tokens and heads; the
// head's d values are contiguous.
struct Heads {
  const c10::BFloat16* data;
  int64_t token_stride, head_stride;
};

// Whether the varlen op attends bfloat16 with brgemm_attend here: on a CPU with avx512_bf16 and no AMX. (With AMX,
// ATen's own kernel runs its products on AMX brgemm: a brgemm prototype of ours was slower there.)
bool brgemm_attention_runs();

// out[i, h] = sum_j softmax_j(q[i, h] . k[j, h] + bias[h, i, j]) v[j, h] for the `length` tokens i, j of one
// sequence and its `heads` heads of d values, each of q, k, v read as x * x_scale[token] rounded to bfloat16 when
// x_scale is given. bias: bfloat16 (as ATen's kernel takes it), head h's row i at bias + h * bias_head_stride +
// i * bias_row_stride, its first `length` columns contiguous. out: bfloat16, token t's head h at
// out + t * out_token_stride + h * d.
void brgemm_attend(Heads q, Heads k, Heads v, const float* x_scale, int64_t length, int64_t heads, int64_t d,
                   const c10::BFloat16* bias, int64_t bias_head_stride, int64_t bias_row_stride, c10::BFloat16* out,
                   int64_t out_token_stride);

// A thread that ran brgemm_attend calls this when it is done with them (brgemm's release of its hardware state).
void brgemm_attention_done();

}  // namespace fastinstructor
