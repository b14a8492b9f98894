// What the native ops' loops share: float32 and bfloat16 elements as they read and write them, and a row's
// int8 quantization (t5.quantize_rows_ref's arithmetic).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastinstructor {

// bfloat16 <-> float32 bit by bit, in forms the compiler vectorizes: c10::BFloat16's own conversion (round to
// nearest even, NaN kept NaN) is the same arithmetic but compiles to a scalar loop, four times slower here.
inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline void store(float v, float* out) { *out = v; }
inline void store(float v, c10::BFloat16* out) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  out->x = static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

constexpr float kQmax = 127.0f;

// |v| as its bit pattern: for floats >= 0 the order of the patterns (as unsigned integers) is the order of the
// values, and an integer max reduction vectorizes with no pragma. An `omp simd reduction(max : ...)` over floats
// compiles to gathers under -fopenmp (1.5x slower than scalar code) and without it, to scalar code.
inline uint32_t abs_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7FFFFFFFu;
}
inline float from_bits(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Row y (float32), the bits of its largest magnitude already known (abs_bits) -> int8 q and its scale
// (t5.quantize_rows_ref's arithmetic).
inline void quantize_row(const float* y, int64_t d, uint32_t most, int8_t* q, float* scale) {
  const float amax = std::max(from_bits(most), 1e-8f);
  const float inv = (1.0f / amax) * kQmax;  // as torch computes the reference's QMAX / amax: the same rounding
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const float v = y[i] * inv;
    const int32_t r = static_cast<int32_t>(v + std::copysign(0.5f, v));  // the cast truncates: half away from 0
    q[i] = static_cast<int8_t>(std::min(std::max(r, -127), 127));
  }
  *scale = amax / kQmax;
}

}  // namespace fastinstructor
