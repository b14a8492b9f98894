// float32 and bfloat16 elements as the native ops' loops read and write them (included by each op's file).
#pragma once

#include <c10/util/BFloat16.h>

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

}  // namespace fastinstructor
