// Packed (varlen) self-attention with a relative position bias, on the CPU: the twin of the Triton kernel in
// fastinstructor/kernels/attention.py. The maths and its reference are fastinstructor/t5.py's varlen_attention_ref:
//
//     o[i] = sum_j softmax_j(q[i] . k[j] + position_bias[h, i, j]) v[j]        over the tokens j of i's sequence
//
// with no 1/sqrt(d) scaling (T5) and the softmax in float32. position_bias [H, Lmax, Lmax] is the bias of a
// sequence of the batch's longest length (t5.position_bias_matrix, built once per batch and shared by every
// layer); it depends only on j - i, so a sequence of L tokens reads its top-left [L, L] block: there is no
// [B, H, L, L] bias tensor and no padded batch. Layouts: q, k, v, out [T, H, D] packed tokens (float32 or
// bfloat16); cu_seqlens [B + 1] (int32 or int64) the sequences' boundaries. Work is split over (sequence, heads)
// tasks run by every thread (at::parallel_for), so a batch of short sequences costs no Python loop and every core
// works. A task is one call of ATen's fused CPU attention (scaled_dot_product_attention: flash attention,
// vectorized) on views, except in bfloat16 on a CPU with avx512_bf16 and no AMX, where it is brgemm_attend
// (brgemm_attention.cpp: ATen's bfloat16 kernel there runs at a third of the CPU's bfloat16 products). For ATen's
// kernel, a bfloat16 sequence whose length is not a multiple of 16 is attended as one that is (its padded keys
// masked) when position_bias covers the batch's longest length + 15 (t5.position_bias_matrix of that length, as
// the cpu backend builds it): ATen's kernel runs such lengths up to twice as fast. With x_scale [T] (the
// per-token scale the int8 qkv product leaves to apply), q, k and v are read as x * x_scale[:, None, None]: each
// task scales its block into a buffer of its own as it reads it, in q's dtype, the arithmetic of a pass over the
// whole product's output (which this replaces). varlen_attention_quantized returns the output's rows quantized per
// token (t5.quantize_rows_ref), as int8's o product takes them: each task that has all its sequence's heads
// quantizes its rows as it has them (from ATen's result, with no [T, H, D] output written; brgemm_attend's rows
// from the output it wrote them to).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <vector>

#include "brgemm_attention.h"
#include "rows.h"

namespace {

using fastinstructor::abs_bits;
using fastinstructor::load;
using fastinstructor::quantize_row;
using fastinstructor::store;

constexpr int64_t kPadTo = 16;

// `rows` tokens x `group` heads of x (its row and head strides given, its last dimension contiguous), each row
// times its scale, into `out` [group, rows, D]: a task's block of q, k or v with the int8 qkv product's per-token
// scale applied.
template <typename T>
void scaled_block(const T* x, int64_t row_stride, int64_t head_stride, const float* scale, int64_t rows,
                  int64_t group, int64_t d, T* out) {
  for (int64_t h = 0; h < group; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* in = x + r * row_stride + h * head_stride;
      T* o = out + (h * rows + r) * d;
      const float f = scale[r];
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) store(load(in[i]) * f, o + i);
    }
  }
}

// Whether every column of a contiguous bfloat16 bias [H, L, L] from `first` on is -inf: a loop over its bits, where
// ATen's isneginf(...).all() took 10-30 us per call, a fifth of a short sequence's attention.
bool masked_from(const at::Tensor& bias, int64_t first) {
  if (bias.scalar_type() != at::kBFloat16 || !bias.is_contiguous()) return false;
  const int64_t rows = bias.size(0) * bias.size(1), columns = bias.size(2);
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(bias.data_ptr<c10::BFloat16>());
  constexpr uint16_t kMinusInf = 0xFF80;
  bool all = true;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = bits + r * columns;
    for (int64_t c = first; c < columns; ++c) all &= row[c] == kMinusInf;
  }
  return all;
}

// n tokens of an attention output x [1, H, >= n, D] (any strides) -> each token's H * D values quantized per row
// into q [n, H * D] and scale [n] (the quantization that the o product's input takes).
template <typename T>
void quantize_tokens(const at::Tensor& x, int64_t n, int8_t* q, float* scale) {
  const int64_t heads = x.size(1), d = x.size(3), width = heads * d;
  const int64_t head_stride = x.stride(1), token_stride = x.stride(2), step = x.stride(3);
  const T* data = x.data_ptr<T>();
  std::vector<float> row(width);
  for (int64_t t = 0; t < n; ++t) {
    uint32_t most = 0;
    for (int64_t h = 0; h < heads; ++h) {
      const T* in = data + t * token_stride + h * head_stride;
      float* r = row.data() + h * d;
      for (int64_t i = 0; i < d; ++i) {
        r[i] = load(in[i * step]);
        most = std::max(most, abs_bits(r[i]));
      }
    }
    quantize_row(row.data(), width, most, q + t * width, scale + t);
  }
}

void quantize_tokens(const at::Tensor& x, int64_t n, int8_t* q, float* scale) {
  if (x.scalar_type() == at::kFloat) {
    quantize_tokens<float>(x, n, q, scale);
  } else {
    quantize_tokens<c10::BFloat16>(x, n, q, scale);
  }
}

// The ops' body: the attention output [T, H, D] in q's dtype, or with `quantize` its rows quantized as
// (q [T, H * D] int8, scale [T]).
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& cu_seqlens, const at::Tensor& position_bias,
                                          const c10::optional<at::Tensor>& x_scale, bool quantize) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "varlen_attention: q, k, v must be [T, H, D] of one shape, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "varlen_attention: the native op runs on the CPU");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "varlen_attention: q, k, v must share a float32 or bfloat16 dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 &&
                  (cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong),
              "varlen_attention: cu_seqlens must be int32/int64 [B + 1]");
  const int64_t tokens = q.size(0), heads = q.size(1);
  TORCH_CHECK(position_bias.dim() == 3 && position_bias.size(0) == heads &&
                  position_bias.size(1) == position_bias.size(2),
              "varlen_attention: position_bias must be [", heads, ", Lmax, Lmax], got ", position_bias.sizes());
  const int64_t covered = position_bias.size(1);
  at::Tensor scales;
  if (x_scale.has_value()) {
    TORCH_CHECK(x_scale->dim() == 1 && x_scale->size(0) == tokens, "varlen_attention: x_scale must be [", tokens,
                "], got ", x_scale->sizes());
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                "varlen_attention: with x_scale, q, k and v must be contiguous in their last dimension");
    scales = x_scale->to(at::kFloat).contiguous();
  }
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* bounds = cu.data_ptr<int64_t>();
  const int64_t batch = cu.numel() - 1;
  TORCH_CHECK(bounds[0] == 0 && bounds[batch] == tokens, "varlen_attention: cu_seqlens must run from 0 to T = ",
              tokens);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = bounds[b + 1] - bounds[b];
    TORCH_CHECK(length >= 0 && length <= covered, "varlen_attention: sequence ", b, " has ", length,
                " tokens; position_bias covers ", covered);
  }
  int64_t longest = 0;
  bool ragged = false;  // a sequence whose length is not a multiple of 16
  for (int64_t b = 0; b < batch; ++b) {
    longest = std::max(longest, bounds[b + 1] - bounds[b]);
    ragged = ragged || (bounds[b + 1] - bounds[b]) % kPadTo != 0;
  }
  // In bfloat16, ATen's CPU attention runs key lengths that are multiples of 16 up to twice as fast as the others
  // (its blocked kernels take a slow path for a tail: 125 us for L = 46 against 72 for L = 48, 12 heads of 64, on
  // the Xeon with AMX; in float32 the padded rows cost about what they save). A bfloat16 sequence of L tokens is
  // therefore attended as Lp = L rounded up to 16 rows of the packed tensors, when the batch has them and the bias
  // covers the longest length + 15: its view runs into the next sequence's tokens, whose keys its mask hides
  // (-inf) and whose query rows it drops. No copy of q, k or v, and one mask buffer for every sequence: the bias
  // in the inputs' dtype (as SDPA takes it) with its columns from `longest` on set to -inf, the op's copy or the
  // caller's own (checked). The
  // bias depends only on j - i, so the block that starts at (s, s) on the diagonal holds the same values as the
  // top-left one; with s = longest - L its columns from L on are the -inf ones.
  const bool brgemm = q.scalar_type() == at::kBFloat16 && fastinstructor::brgemm_attention_runs();
  const bool pad = q.scalar_type() == at::kBFloat16 && !brgemm && ragged && covered >= longest + kPadTo - 1;
  // A caller that runs several calls on one bias (the cpu backend: every layer of a forward) can pass it in q's
  // dtype with those columns at -inf already, and no call copies it (1.9 ms for a bias of 12 x 527 x 527).
  const bool masked = pad && position_bias.scalar_type() == q.scalar_type() && masked_from(position_bias, longest);
  at::Tensor bias = position_bias.to(q.scalar_type(), /*non_blocking=*/false, /*copy=*/pad && !masked).contiguous();
  if (pad && !masked) bias.narrow(2, longest, covered - longest).fill_(-std::numeric_limits<float>::infinity());
  auto padded_length = [&](int64_t b) {
    const int64_t start = bounds[b], length = bounds[b + 1] - start;
    const int64_t padded = (length + kPadTo - 1) / kPadTo * kPadTo;
    return pad && start + padded <= tokens ? padded : length;
  };
  // A task is one sequence and a group of its heads. A sequence whose share of the work (about L^2) is more than
  // a quarter of a thread's is split into groups of fewer heads, at most one group per thread (one head at the
  // least), so that a batch with one long sequence still uses every thread; the others keep all their heads in one
  // call. More groups than threads only adds calls: one text of 44 tokens, 12 heads, two threads took 180 us in
  // 12 one-head calls and 111 us in two of six. The tasks run longest first, each thread taking the next one when
  // it is done (a static split of the list would leave one thread with the long tasks).
  struct Task {
    int64_t sequence, first_head, heads, work;
  };
  const int64_t threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) total += (bounds[b + 1] - bounds[b]) * (bounds[b + 1] - bounds[b]);
  const int64_t share = std::max<int64_t>(1, total / (4 * threads));
  std::vector<Task> tasks;
  std::vector<int64_t> split;  // the sequences split over tasks
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = bounds[b + 1] - bounds[b], work = length * length;
    if (length == 0) continue;
    int64_t groups = std::min({heads, threads, (work + share - 1) / share});
    while (heads % groups != 0) ++groups;  // groups of equal size
    for (int64_t g = 0; g < groups; ++g) tasks.push_back({b, g * (heads / groups), heads / groups, work / groups});
    if (groups > 1) split.push_back(b);
  }
  // Quantized, a task that has all its sequence's heads quantizes the output's rows as it has them; the others
  // write theirs to `out`, whose rows are quantized once every task is done.
  const int64_t width = heads * q.size(2);
  at::Tensor quantized, scale, out;
  if (quantize) {
    quantized = at::empty({tokens, width}, q.options().dtype(at::kChar));
    scale = at::empty({tokens}, q.options().dtype(at::kFloat));
  }
  if (!quantize || !split.empty() || brgemm) out = at::empty_like(q, at::MemoryFormat::Contiguous);
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.work > b.work; });
  // The tasks call ATen ops on other threads, which do not inherit the caller's thread-local state (inference
  // mode: `out` is an inference tensor when the caller runs in one, and only inference mode may write it).
  const at::ThreadLocalState caller;
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(caller);
    for (size_t t = next++; t < tasks.size(); t = next++) {
      const Task& task = tasks[t];
      const int64_t start = bounds[task.sequence], length = bounds[task.sequence + 1] - start;
      const int64_t rows = padded_length(task.sequence), h0 = task.first_head, group = task.heads;
      // Each view in one as_strided call (a chain of narrow/transpose/unsqueeze is four dispatches, and these
      // calls are short enough for that to show).
      auto heads_of = [&](const at::Tensor& t, int64_t n) {  // [1, group, n, D]: the sequence's heads
        return t.as_strided({1, group, n, t.size(2)}, {0, t.stride(1), t.stride(0), t.stride(2)},
                            t.storage_offset() + start * t.stride(0) + h0 * t.stride(1));
      };
      if (brgemm) {  // into `out`, whose rows it then quantizes where it has all the heads
        auto at_task = [&](const at::Tensor& x) {  // the sequence's first token, the task's first head
          return x.data_ptr<c10::BFloat16>() + start * x.stride(0) + h0 * x.stride(1);
        };
        auto view = [&](const at::Tensor& x) { return fastinstructor::Heads{at_task(x), x.stride(0), x.stride(1)}; };
        const float* x_scale = scales.defined() ? scales.data_ptr<float>() + start : nullptr;
        fastinstructor::brgemm_attend(view(q), view(k), view(v), x_scale, length, group, q.size(2),
                                      bias.data_ptr<c10::BFloat16>() + h0 * bias.stride(0), bias.stride(0),
                                      bias.stride(1), at_task(out), out.stride(0));
        if (quantize && group == heads) {
          quantize_tokens(heads_of(out, length), length, quantized.data_ptr<int8_t>() + start * width,
                          scale.data_ptr<float>() + start);
        }
        continue;
      }
      const int64_t corner = rows == length ? 0 : longest - length;  // the mask's block: (corner, corner) on
      const int64_t offset = bias.storage_offset() + h0 * bias.stride(0) + corner * (bias.stride(1) + 1);
      const at::Tensor mask = bias.as_strided({1, group, rows, rows}, {0, bias.stride(0), bias.stride(1), 1}, offset);
      auto input = [&](const at::Tensor& t) {  // the task's [1, group, rows, D] of q, k or v, scaled if asked
        if (!scales.defined()) return heads_of(t, rows);
        at::Tensor block = at::empty({1, group, rows, t.size(2)}, t.options());
        const int64_t first = start * t.stride(0) + h0 * t.stride(1);
        const float* f = scales.data_ptr<float>() + start;
        if (t.scalar_type() == at::kFloat) {
          scaled_block(t.data_ptr<float>() + first, t.stride(0), t.stride(1), f, rows, group, t.size(2),
                       block.data_ptr<float>());
        } else {
          scaled_block(t.data_ptr<c10::BFloat16>() + first, t.stride(0), t.stride(1), f, rows, group, t.size(2),
                       block.data_ptr<c10::BFloat16>());
        }
        return block;
      };
      const at::Tensor result = at::scaled_dot_product_attention(input(q), input(k), input(v), mask, 0.0, false,
                                                                 /*scale=*/1.0);
      const at::Tensor kept = rows == length ? result : result.narrow(2, 0, length);
      if (quantize && group == heads) {
        quantize_tokens(kept, length, quantized.data_ptr<int8_t>() + start * width, scale.data_ptr<float>() + start);
      } else {
        heads_of(out, length).copy_(kept);
      }
    }
    if (brgemm) fastinstructor::brgemm_attention_done();
  });
  if (!quantize) return {out, at::Tensor()};
  std::vector<at::Tensor> split_rows;  // [1, H, L, D] views, made here: the threads run no ATen op
  for (const int64_t b : split) {
    split_rows.push_back(out.narrow(0, bounds[b], bounds[b + 1] - bounds[b]).permute({1, 0, 2}).unsqueeze(0));
  }
  at::parallel_for(0, static_cast<int64_t>(split.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t start = bounds[split[i]];
      quantize_tokens(split_rows[i], split_rows[i].size(2), quantized.data_ptr<int8_t>() + start * width,
                      scale.data_ptr<float>() + start);
    }
  });
  return {quantized, scale};
}

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, const at::Tensor& position_bias,
                            const c10::optional<at::Tensor>& x_scale) {
  return std::get<0>(attend(q, k, v, cu_seqlens, position_bias, x_scale, /*quantize=*/false));
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_quantized(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                              const at::Tensor& position_bias,
                                                              const c10::optional<at::Tensor>& x_scale) {
  return attend(q, k, v, cu_seqlens, position_bias, x_scale, /*quantize=*/true);
}

}  // namespace

TORCH_LIBRARY(fastinstructor, m) {
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor position_bias, Tensor? x_scale=None)"
      " -> Tensor");
  m.def(
      "varlen_attention_quantized(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor position_bias,"
      " Tensor? x_scale=None) -> (Tensor, Tensor)");
  // Which kernel attends bfloat16 here (no tensor to dispatch on: one kernel for every device).
  m.def("brgemm_attention_runs() -> bool", &fastinstructor::brgemm_attention_runs);
}

TORCH_LIBRARY_IMPL(fastinstructor, CPU, m) {
  m.impl("varlen_attention", &varlen_attention);
  m.impl("varlen_attention_quantized", &varlen_attention_quantized);
}
