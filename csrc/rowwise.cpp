// Row-wise ops on the CPU: the residual add + T5 RMSNorm and per-row int8 quantization (the twins of the Triton
// kernels in fastinstructor/kernels/rms_norm.py and quantize.py).
// The maths and their references are fastinstructor/t5.py's rms_norm_ref, rms_norm_quantized_ref and
// quantize_rows_ref:
//
//     s = x + residual                       (float32; s = x without a residual)
//     y = weight * s / sqrt(mean(s^2) + eps)  in out_dtype, or quantized per row:
//     amax = max(max |y|, 1e-8),  q = round_half_away(y * 127 / amax) in [-127, 127],  scale = amax / 127
//
// One pass over each row: the row is read once into a float32 buffer (it stays in the L1 cache), and every
// output is written from there, where PyTorch's own ops would make five or six passes over memory; on these
// machines a pass over a batch's activations costs as much as a small product. For the same reason the residual
// stream is updated in place, and x may come with the per-row scale an int8 product left to apply (x_scale: x is
// read as x * x_scale[:, None]). Layouts: x [T, D] float32 or bfloat16 (the previous product's output), residual
// [T, D] float32 (the residual stream), weight [D], x_scale [T]; rows in parallel (at::parallel_for). Loops are
// plain C++ that the compiler vectorizes for the building machine (-march=native; -fopenmp-simd for the
// reductions, -fopenmp for at::parallel_for's threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "rows.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using fastinstructor::abs_bits;
using fastinstructor::load;
using fastinstructor::quantize_row;
using fastinstructor::store;

void check_rows(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": the native op runs on the CPU");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, D], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
}

// Grain: rows per task, about 32 KiB of input each (a task is worth a thread's start).
int64_t grain(int64_t d) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)); }

// A per-row factor: x_scale[row] when the caller has one (the per-token scale an int8 product left to apply),
// else 1 (exact).
struct RowScale {
  const float* scales = nullptr;
  float operator()(int64_t row) const { return scales ? scales[row] : 1.0f; }
};

RowScale row_scale(const char* op, const c10::optional<at::Tensor>& x_scale, int64_t rows, at::Tensor& holder) {
  if (!x_scale.has_value()) return {};
  TORCH_CHECK(x_scale->dim() == 1 && x_scale->size(0) == rows, op, ": x_scale must be [", rows, "], got ",
              x_scale->sizes());
  holder = x_scale->to(at::kFloat).contiguous();
  return {holder.data_ptr<float>()};
}

// The shared body: s = x * x_scale (+ residual, written back into it), y = rms_norm(s) into `emit(row, y, most)`,
// most the bits of max |y| (abs_bits).
template <typename In, typename Emit>
void norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, float* residual, RowScale scale,
               Emit emit) {
  const int64_t rows = x.size(0), d = x.size(1);
  const In* xs = x.data_ptr<In>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, grain(d), [&](int64_t first, int64_t last) {
    std::vector<float> buffer(d);
    float* s = buffer.data();
    for (int64_t row = first; row < last; ++row) {
      const In* xr = xs + row * d;
      const float f = scale(row);
      float squares = 0.0f;
      if (residual) {
        float* rr = residual + row * d;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < d; ++i) {
          s[i] = load(xr[i]) * f + rr[i];
          rr[i] = s[i];
          squares += s[i] * s[i];
        }
      } else {
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < d; ++i) {
          s[i] = load(xr[i]) * f;
          squares += s[i] * s[i];
        }
      }
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
      uint32_t most = 0;  // for a quantizing emit
      for (int64_t i = 0; i < d; ++i) {
        s[i] = w[i] * (s[i] * inv);
        most = std::max(most, abs_bits(s[i]));
      }
      emit(row, s, most);
    }
  });
}

// Checks, then norm_rows on x's dtype. The residual stream is updated in place (s replaces it).
template <typename Emit>
void dispatch_norm(const char* op, const at::Tensor& x_in, const at::Tensor& weight_in, double eps,
                         const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& x_scale,
                         Emit emit) {
  check_rows(op, x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.size(1);
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == d, op, ": weight must be [", d, "], got ",
              weight_in.sizes());
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  float* sums = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kFloat &&
                    residual->is_contiguous(),
                op, ": residual must be a contiguous float32 ", x.sizes(), ", got ", residual->scalar_type(), " ",
                residual->sizes());
    sums = residual->data_ptr<float>();
  }
  at::Tensor holder;
  const RowScale scale = row_scale(op, x_scale, x.size(0), holder);
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x, weight, eps, sums, scale, emit);
  } else {
    norm_rows<c10::BFloat16>(x, weight, eps, sums, scale, emit);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const c10::optional<at::Tensor>& residual, c10::optional<at::ScalarType> out_dtype,
                    const c10::optional<at::Tensor>& x_scale) {
  const at::ScalarType dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rms_norm: out_dtype must be float32 or bfloat16, got ",
              dtype);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(dtype));
  const int64_t d = x.dim() == 2 ? x.size(1) : 0;
  if (dtype == at::kFloat) {
    float* out = y.data_ptr<float>();
    dispatch_norm("rms_norm", x, weight, eps, residual, x_scale, [&](int64_t row, const float* s, uint32_t) {
      std::memcpy(out + row * d, s, d * sizeof(float));
    });
  } else {
    c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
    dispatch_norm("rms_norm", x, weight, eps, residual, x_scale, [&](int64_t row, const float* s, uint32_t) {
      c10::BFloat16* o = out + row * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) store(s[i], o + i);
    });
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_quantized(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                      const c10::optional<at::Tensor>& residual,
                                                      const c10::optional<at::Tensor>& x_scale) {
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.dim() == 2 ? x.size(0) : 0}, x.options().dtype(at::kFloat));
  const int64_t d = x.dim() == 2 ? x.size(1) : 0;
  int8_t* qs = q.data_ptr<int8_t>();
  float* scales = scale.data_ptr<float>();
  auto emit = [&](int64_t row, const float* s, uint32_t most) { quantize_row(s, d, most, qs + row * d, scales + row); };
  dispatch_norm("rms_norm_quantized", x, weight, eps, residual, x_scale, emit);
  return {q, scale};
}

template <typename In>
void quantize_rows_impl(const at::Tensor& x, bool relu, RowScale factor, int8_t* qs, float* scales) {
  const int64_t rows = x.size(0), d = x.size(1);
  const In* xs = x.data_ptr<In>();
  at::parallel_for(0, rows, grain(d), [&](int64_t first, int64_t last) {
    std::vector<float> buffer(d);
    float* y = buffer.data();
    for (int64_t row = first; row < last; ++row) {
      const In* xr = xs + row * d;
      const float f = factor(row);
      const float floor = relu ? 0.0f : -std::numeric_limits<float>::infinity();
      uint32_t most = 0;
      for (int64_t i = 0; i < d; ++i) {
        y[i] = std::max(load(xr[i]) * f, floor);
        most = std::max(most, abs_bits(y[i]));
      }
      quantize_row(y, d, most, qs + row * d, scales + row);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in, bool relu,
                                                 const c10::optional<at::Tensor>& x_scale) {
  check_rows("quantize_rows", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor holder;
  const RowScale factor = row_scale("quantize_rows", x_scale, x.size(0), holder);
  if (x.scalar_type() == at::kFloat) {
    quantize_rows_impl<float>(x, relu, factor, q.data_ptr<int8_t>(), scale.data_ptr<float>());
  } else {
    quantize_rows_impl<c10::BFloat16>(x, relu, factor, q.data_ptr<int8_t>(), scale.data_ptr<float>());
  }
  return {q, scale};
}

// How many threads the ops' loops run on: torch.get_num_threads() when the library was built with the OpenMP that
// torch's at::parallel_for uses (a header template: an `omp parallel` region), 1 when it was built without it.
int64_t parallel_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (seen < id && !most.compare_exchange_weak(seen, id)) {
    }
  });
  return most.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastinstructor, m) {
  m.def(
      "rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!)? residual, ScalarType? out_dtype, Tensor? x_scale)"
      " -> Tensor");
  m.def(
      "rms_norm_quantized(Tensor x, Tensor weight, float eps, Tensor(a!)? residual, Tensor? x_scale)"
      " -> (Tensor, Tensor)");
  m.def("quantize_rows(Tensor x, bool relu, Tensor? x_scale) -> (Tensor, Tensor)");
  m.def("parallel_threads() -> int", &parallel_threads);  // no tensor to dispatch on: one kernel for every device
}

TORCH_LIBRARY_IMPL(fastinstructor, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_quantized", &rms_norm_quantized);
  m.impl("quantize_rows", &quantize_rows);
}
