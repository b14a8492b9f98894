// One sequence's bfloat16 attention on oneDNN's brgemm kernels: the varlen op's kernel for bfloat16 on a CPU with
// avx512_bf16 and no AMX. The maths is t5.varlen_attention_ref's (no 1/sqrt(d) scaling, the softmax in float32).
//
// Why not ATen's fused attention (scaled_dot_product_attention), which the op runs otherwise: without AMX, ATen's
// bfloat16 flash kernel runs its products through cpublas::gemm, and on the AMD EPYC with avx512_bf16 it reached
// 128 GFLOP/s at L = 512 (12 heads of 64), where the same two products on brgemm run at 360-420 GFLOP/s and a large
// bfloat16 matmul at 410. (With AMX, ATen's kernel packs its operands for AMX brgemm itself, and is kept.) Here,
// per head and block of 32 query rows:
//
//     S = Q K^T         (bfloat16 x bfloat16 -> float32, brgemm; K packed once per head in brgemm's VNNI layout)
//     P = exp(S + bias - max)   (float32, AVX-512, written to bfloat16 for the next product; 1 / sum kept)
//     O = (P V) / sum   (brgemm, V packed once per head; out in bfloat16)
//
// The keys are padded to a multiple of 32 (zeros in V, P's padded columns 0) and the last block of rows to 16 or
// 32, so a batch of every length from 1 to 512 needs few brgemm shapes (each one JIT-compiled once per thread).
#include "brgemm_attention.h"

#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "rows.h"

// GCC 12 warns of `_mm512_undefined` inside its own AVX-512 headers (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace fastinstructor {
namespace {

using BF = c10::BFloat16;

constexpr int64_t kBlock = 32;  // query rows per product, and the keys' padding

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// The kernel's AVX-512 functions, compiled for AVX-512 whatever the build's -march: they run only where
// brgemm_attention_runs() (every CPU with avx512_bf16 or AMX has AVX-512 F, BW, VL and DQ).
#define FASTINSTRUCTOR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// exp(x) for x <= 0 (Cephes' expf: 2^n e^r with |r| <= ln2 / 2 and a degree-6 polynomial; relative error about
// 1e-7), exp(-87.3) = 1e-38 for anything below.
FASTINSTRUCTOR_AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact to float
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// 16 finite floats -> bfloat16, rounded to nearest even (rows.h's store, 16 at a time).
FASTINSTRUCTOR_AVX512 inline __m256i to_bfloat16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// 16 bfloat16 -> float32 (the lanes of m; 0 elsewhere).
FASTINSTRUCTOR_AVX512 inline __m512 load_bfloat16(__mmask16 m, const BF* x) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// One row of scores s [length] (float32): s + bias, then p = exp(s - max) in bfloat16 with zeros up to `padded` (a
// multiple of 16); returns 1 / sum(p), which the output's row takes.
FASTINSTRUCTOR_AVX512 float softmax_row(float* s, const BF* bias, int64_t length, int64_t padded, BF* p) {
  const int64_t full = length / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (length - full)) - 1);
  __m512 most = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < length; j += 16) {
    const __mmask16 m = j < full ? static_cast<__mmask16>(0xFFFF) : tail;
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, s + j), load_bfloat16(m, bias + j));
    _mm512_mask_storeu_ps(s + j, m, x);
    most = _mm512_mask_max_ps(most, m, most, x);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(most));
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j < length; j += 16) {
    const __mmask16 m = j < full ? static_cast<__mmask16>(0xFFFF) : tail;
    const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top)));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bfloat16(e));
  }
  for (; j < padded; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), _mm256_setzero_si256());
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// Token j's d values of a head, times x_scale[j] where given, rounded to bfloat16 (the arithmetic of scaling the
// whole product's output first), into out [d], then a zero to an even count.
void read_row(const BF* in, const float* x_scale, int64_t j, int64_t d, BF* out) {
  if (x_scale == nullptr) {
    std::memcpy(out, in, d * sizeof(BF));
  } else {
    const float f = x_scale[j];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) store(load(in[i]) * f, out + i);
  }
  if (d % 2 != 0) out[d] = BF(0.0f);
}

// brgemm's VNNI layout for a bfloat16 operand B [K, N]: K in pairs, the pair (B[2p, n], B[2p + 1, n]) one 32-bit
// word at word p * N + n. For K^T [d, keys] a pair is two neighbours of a token's row (a word of the row, as it
// is); for V [keys, d], the same value of two tokens.
uint32_t word(const BF* pair) {
  uint32_t w;
  std::memcpy(&w, pair, sizeof(w));
  return w;
}
uint32_t bits(BF v) { return v.x; }

struct Scratch {
  std::vector<BF> q, k, v, p, row;
  std::vector<float> s, o, inv;
};

}  // namespace

bool brgemm_attention_runs() {
  static const bool runs = __builtin_cpu_supports("avx512bf16") && !__builtin_cpu_supports("amx-bf16");
  return runs;
}

void brgemm_attend(Heads q, Heads k, Heads v, const float* x_scale, int64_t length, int64_t heads, int64_t d,
                   const BF* bias, int64_t bias_head_stride, int64_t bias_row_stride, BF* out,
                   int64_t out_token_stride) {
  thread_local Scratch scratch;
  Scratch& b = scratch;
  const int64_t keys = round_up(length, kBlock), rows = round_up(length, 16);
  const int64_t dk = round_up(d, 2);  // the QK^T product's reduction, in pairs (VNNI): an odd d gets a zero
  // Zeros where no token is: V's padded rows must be (P's columns there are 0, and 0 times a NaN left in the buffer
  // would be NaN); Q's padded rows and K^T's padded columns only feed scores that are dropped, zeroed all the same.
  b.q.assign(rows * dk, BF(0.0f));
  b.k.assign(dk * keys, BF(0.0f));
  b.v.assign(keys * d, BF(0.0f));
  b.row.resize(2 * dk);
  b.p.resize(kBlock * keys);
  b.s.resize(kBlock * keys);
  b.o.resize(kBlock * d);
  b.inv.resize(kBlock);
  uint32_t* const k_words = reinterpret_cast<uint32_t*>(b.k.data());
  uint32_t* const v_words = reinterpret_cast<uint32_t*>(b.v.data());
  for (int64_t h = 0; h < heads; ++h) {
    const BF* const q_in = q.data + h * q.head_stride;
    const BF* const k_in = k.data + h * k.head_stride;
    const BF* const v_in = v.data + h * v.head_stride;
    for (int64_t j = 0; j < length; ++j) {
      read_row(q_in + j * q.token_stride, x_scale, j, d, b.q.data() + j * dk);
      read_row(k_in + j * k.token_stride, x_scale, j, d, b.row.data());
      for (int64_t p = 0; p < dk / 2; ++p) k_words[p * keys + j] = word(b.row.data() + 2 * p);
    }
    for (int64_t j = 0; j < length; j += 2) {  // V two tokens at a time; a zero token after the last odd one
      BF* const even = b.row.data();
      BF* const odd = b.row.data() + dk;
      read_row(v_in + j * v.token_stride, x_scale, j, d, even);
      if (j + 1 < length) {
        read_row(v_in + (j + 1) * v.token_stride, x_scale, j + 1, d, odd);
      } else {
        std::fill(odd, odd + d, BF(0.0f));
      }
      uint32_t* const out = v_words + (j / 2) * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) out[i] = bits(even[i]) | bits(odd[i]) << 16;
    }
    for (int64_t r0 = 0; r0 < length; r0 += kBlock) {
      const int64_t m = std::min(kBlock, rows - r0), real = std::min(kBlock, length - r0);
      at::native::cpublas::brgemm(m, keys, dk, dk, keys, keys, false, b.q.data() + r0 * dk, b.k.data(), b.s.data(),
                                  true);
      for (int64_t i = 0; i < real; ++i) {
        b.inv[i] = softmax_row(b.s.data() + i * keys, bias + h * bias_head_stride + (r0 + i) * bias_row_stride,
                               length, keys, b.p.data() + i * keys);
      }
      at::native::cpublas::brgemm(m, d, keys, keys, d, d, false, b.p.data(), b.v.data(), b.o.data(), true);
      for (int64_t i = 0; i < real; ++i) {
        BF* row = out + (r0 + i) * out_token_stride + h * d;
        const float* o = b.o.data() + i * d;
        const float f = b.inv[i];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) store(o[c] * f, row + c);
      }
    }
  }
}

void brgemm_attention_done() { at::native::cpublas::brgemm_release(true); }

}  // namespace fastinstructor
