// GELU of bf16 values, in place, by table: GELU(x) = x · Φ(x) = x/2 · (1 + erf(x / √2)), the
// exact erf form BERT uses.
//
// A bf16 value has 16 bits, so the function has only 65,536 inputs: the table holds the result
// of each, computed once in double precision when the library loads and rounded to bf16 (through
// fp32, as PyTorch converts a double to bf16). A GELU is then one 16-lane gather from the table
// (AVX-512; one lookup a value elsewhere) instead of the ~45 vector operations of an erf
// polynomial and an exponential, which is what oneDNN's GELU post-op and PyTorch's GELU spend.
// The feed-forward's first projection thus runs without its activation, and this pass follows it
// (engine/linear.py): in bf16 the projection is rounded to bf16 before GELU, as PyTorch's own
// bf16 route (a linear, then F.gelu) rounds it; the GELU itself is correctly rounded.
//
// NaN stays NaN, GELU(+inf) = +inf, GELU(-inf) = NaN (-inf · 0, as PyTorch computes it).

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

uint16_t bf16_from_float(float f) {  // to nearest even, as PyTorch rounds; NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

struct GeluTable {
  uint16_t value[65536 + 1] = {};  // + 1: a gather reads 4 bytes, the last entry's 2 and these
  GeluTable() {
    for (uint32_t bits = 0; bits < 65536; ++bits) {
      const uint32_t u = bits << 16;
      float x;
      std::memcpy(&x, &u, sizeof x);
      const double d = x;
      value[bits] = bf16_from_float(float(0.5 * d * (1.0 + std::erf(d * 0.70710678118654752440))));
    }
  }
};

const GeluTable table;  // built when the library loads (~1 ms)

}  // namespace

extern "C" {

// x: n bf16 values (contiguous), replaced by their GELU, on `threads` threads.
void ctxvec_gelu_bf16_(uint16_t* x, int64_t n, int threads) {
  constexpr int64_t CHUNK = 4096;  // values a task: a few pages, far above a task's cost
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    uint16_t* p = x + c * CHUNK;
    const int64_t m = c + 1 < chunks ? CHUNK : n - c * CHUNK;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= m; i += 16) {  // 16 values widened to indices, gathered, narrowed back
      const __m512i index = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
      const __m512i found = _mm512_i32gather_epi32(index, table.value, 2);  // 4 bytes at value + 2·index
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), _mm512_cvtepi32_epi16(found));
    }
#endif
    for (; i < m; ++i) p[i] = table.value[p[i]];
  }
}

}
