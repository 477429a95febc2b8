// 16 floats a vector, by GCC/Clang vector extensions: one AVX-512 register (-march=native).
// Without AVX-512 the kernels build and compute the same numbers, but slowly: GCC 12 splits
// the arithmetic into AVX2 halves, yet compares and selects lane by lane.
//
// What the kernels of this folder are written with: the vector types, loads and
// stores that widen bf16 to fp32 and round back, the sums and maxima of a vector's lanes (of
// one, or of 16 at once), a 16 x 16 transpose, and 2^x.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
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
#if defined(__AVX512F__)  // one widening load and a shift (GCC 12 makes 5 instructions of the form below)
  return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  v16h h; std::memcpy(&h, p, sizeof h);
  return (v16)(__builtin_convertvector(h, v16u) << 16);
#endif
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

constexpr int MAX_TOKENS = 256;  // the longest sequence the attention kernels of this folder take
constexpr float LOG2_E = 1.44269504088896341f;

// 2^t for t <= 0, within about a unit in the last place: t = n + f, |f| <= 1/2, 2^f by a
// degree-6 polynomial (fitted for relative error on [-1/2, 1/2]: 1e-7), times 2^n: by AVX-512's
// scalef where there is one (n below the floats' range gives 0, -inf gives NaN: callers mask
// it), else n put into the exponent bits, t first kept >= -126. The kernels take e^x as
// 2^(x log2 e).
inline v16 exp2_nonpositive(v16 t) {
#if defined(__AVX512F__)
  const v16 n = (v16)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT);
#else
  t = t < splat(-126.0f) ? splat(-126.0f) : t;
  const v16 round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (t + round) - round;
#endif
  const v16 f = t - n;
  v16 p = splat(1.5344865096e-4f);
  p = p * f + 1.3399922755e-3f;
  p = p * f + 9.6184927970e-3f;
  p = p * f + 5.5503286421e-2f;
  p = p * f + 2.4022646248e-1f;
  p = p * f + 6.9314718246e-1f;
  p = p * f + 1.0f;
#if defined(__AVX512F__)
  return (v16)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * (v16)e;
#endif
}

// The lanes of the diagonal blocks of s lanes in the first row of a pair, and the shuffles that
// swap the off-diagonal blocks of rows i and i + s (a step of ``transpose``).
inline v16i low_half(int s) { return (LANE & s) == 0; }
inline v16i swap_first(int s) { return low_half(s) ? LANE : LANE + (W - s); }
inline v16i swap_second(int s) { return low_half(s) ? LANE + s : LANE + W; }

// rows[i][l] <- rows[l][i]: the off-diagonal blocks of 8, 4, 2 and 1 lanes swapped in turn,
// 64 two-register shuffles where a lane at a time would take 256 stores.
inline void transpose(v16 (&rows)[W]) {
  for (int s = 8; s; s >>= 1) {
    const v16i first = swap_first(s), second = swap_second(s);
    for (int i = 0; i < W; ++i)
      if (!(i & s)) {
        const v16 a = rows[i], b = rows[i + s];
        rows[i] = __builtin_shuffle(a, b, first);
        rows[i + s] = __builtin_shuffle(a, b, second);
      }
  }
}

// Lane r of the result: op over the lanes of rows[r] (max, sum), 16 rows at once: the steps of
// ``transpose`` with each swapped pair combined by op instead of kept, 30 shuffles and 15 ops
// where a row at a time would take 64 of each in 16 chains (``rows`` is overwritten).
template <typename Op>
inline v16 reduce_rows(v16 (&rows)[W], Op op) {
  for (int s = 8; s; s >>= 1) {
    const v16i first = swap_first(s), second = swap_second(s);
    for (int i = 0; i < s; ++i)
      rows[i] = op(__builtin_shuffle(rows[i], rows[i + s], first), __builtin_shuffle(rows[i], rows[i + s], second));
  }
  return rows[0];
}
inline v16 max_v(v16 a, v16 b) { return a > b ? a : b; }
inline v16 add_v(v16 a, v16 b) { return a + b; }

}  // namespace ctxvec
