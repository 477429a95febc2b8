// 16 floats a vector, by GCC/Clang vector extensions: one AVX-512 register (-march=native).
// Without AVX-512 the kernels build and compute the same numbers, but slowly: GCC 12 splits
// the arithmetic into AVX2 halves, yet compares and selects lane by lane.
//
// What the vector kernels of this folder are written with: the vector types, loads and stores
// that widen bf16 to fp32 and round back, and the sums and maxima of a vector's lanes.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace ctxvec {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
constexpr int W = 16;
const v16i LANE{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline v16 splat(float x) { return v16{} + x; }

// Loads and stores of 16 values, widened to / rounded from fp32.
inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline v16 load16(const uint16_t* p) {  // bf16 -> fp32: the bits move up, exactly
  v16h h; std::memcpy(&h, p, sizeof h);
  return (v16)(__builtin_convertvector(h, v16u) << 16);
}
inline void store16(v16 v, float* p) { std::memcpy(p, &v, sizeof v); }
inline void store16(v16 v, uint16_t* p) {  // fp32 -> bf16, to nearest even (inputs are finite)
#if defined(__AVX512BF16__)
  const __m256bh h = _mm512_cvtneps_pbh((__m512)v);  // one instruction (fp32 subnormals -> 0)
#else
  v16u u = (v16u)v;
  u += 0x7FFFu + ((u >> 16) & 1u);
  const v16h h = __builtin_convertvector(u >> 16, v16h);
#endif
  std::memcpy(p, &h, sizeof h);
}

// The max and the sum of a vector's lanes, by halving: each lane meets the lane k apart.
inline v16 lanes_apart(v16 v, int k) { return __builtin_shuffle(v, LANE ^ k); }
inline float max_of(v16 v) {
  for (int k = 8; k; k >>= 1) { const v16 w = lanes_apart(v, k); v = v > w ? v : w; }
  return v[0];
}
inline float sum_of(v16 v) {
  for (int k = 8; k; k >>= 1) v += lanes_apart(v, k);
  return v[0];
}

}  // namespace ctxvec
