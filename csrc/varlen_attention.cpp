// Packed (varlen) self-attention with a relative position bias, on the CPU: the twin of the Triton kernel in
// kernels/attention.py. The maths and its reference are fastinstructor/t5.py's varlen_attention_ref:
//
//     o[i] = sum_j softmax_j(q[i] . k[j] + position_bias[h, i, j]) v[j]        over the tokens j of i's sequence
//
// with no 1/sqrt(d) scaling (T5) and the softmax in float32. position_bias [H, Lmax, Lmax] is the bias of a
// sequence of the batch's longest length (t5.position_bias_matrix, built once per batch and shared by every
// layer); it depends only on j - i, so a sequence of L tokens reads its top-left [L, L] block: there is no
// [B, H, L, L] bias tensor and no padding. Layouts: q, k, v, out [T, H, D] packed tokens (float32 or
// bfloat16); cu_seqlens [B + 1] (int32 or int64) the sequences' boundaries. Work is split over (sequence, heads)
// tasks with at::parallel_for, each one call of ATen's fused CPU attention (scaled_dot_product_attention: flash
// attention, vectorized) on views, so a batch of short sequences costs no Python loop and every core works.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, const at::Tensor& position_bias) {
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
  const at::Tensor bias = position_bias.to(q.scalar_type());  // SDPA wants the mask in the inputs' dtype
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  // A task is one sequence and a group of its heads: all of them when there are sequences enough to keep every
  // thread busy, else one head (a long single sequence still uses every thread).
  const int64_t group = batch >= 2 * at::get_num_threads() ? heads : 1;
  const int64_t groups = heads / group;
  at::parallel_for(0, batch * groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / groups, h0 = (task % groups) * group;
      const int64_t start = bounds[b], length = bounds[b + 1] - start;
      if (length == 0) continue;
      auto heads_of = [&](const at::Tensor& t) {  // [1, group, L, D] views of the sequence's heads
        return t.narrow(0, start, length).narrow(1, h0, group).transpose(0, 1).unsqueeze(0);
      };
      const at::Tensor mask = bias.narrow(0, h0, group).narrow(1, 0, length).narrow(2, 0, length).unsqueeze(0);
      heads_of(out).copy_(at::scaled_dot_product_attention(heads_of(q), heads_of(k), heads_of(v), mask, 0.0,
                                                           false, /*scale=*/1.0));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(fastinstructor, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor position_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastinstructor, CPU, m) { m.impl("varlen_attention", &varlen_attention); }
