// LayerNorm of rows, fp32 or bf16: each row of D values becomes (x - mean) / √(var + eps) · γ + β,
// the mean and the (biased) variance over the row, in fp32 whatever the input.
//
// PyTorch's CPU LayerNorm takes a row at a time, and in bf16 it runs at about two thirds of the
// speed of its fp32 (on an AMX Xeon, 1,440 rows of 384: 259 µs against 178, one thread; this
// kernel: 110 µs in bf16). Here 16 rows go together: their sums, then their squared deviations
// from the mean (two passes, the rows in L1 after the first), accumulate side by side in 16
// independent chains and are reduced all at once (vec16.h's reduce_rows), then each row is
// written as (x - mean) · rstd · γ + β, rounded to bf16 once for bf16. The same numbers as
// PyTorch's within fp32 rounding (its Welford moments and these two passes differ in the last
// bits; in bf16 that moves an output by one unit in the last place, rarely), but for rows whose
// mean is far larger than their spread: PyTorch writes (x · rstd - rstd · mean) · γ + β, which
// cancels there (a row of 1e30s: NaN from PyTorch, 0 from a fused multiply-add of that form, β,
// exactly, here). The output may be the input itself: a row is written only after it is read
// (its lines are then in cache, so a sum that is not read again is normalised in place ~40%
// faster than into a new tensor).
//
// Letters: R rows, D values a row (a multiple of 16), W = 16 rows a block.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec16.h"

namespace {

using namespace ctxvec;

// Rows x .. x + (n - 1) · ld_in (n <= W) into y; gamma and beta widened to fp32.
template <typename T>
void norm_block(const T* x, int64_t ld_in, T* y, int64_t ld_out, const float* gamma, const float* beta, int n,
                int64_t D, float eps) {
  const T* row[W];
  for (int r = 0; r < W; ++r) row[r] = x + std::min(r, n - 1) * ld_in;  // past n: the last row again, not stored
  v16 acc[W];
  for (v16& a : acc) a = v16{};
  for (int64_t j = 0; j < D; j += W)
    for (int r = 0; r < W; ++r) acc[r] += load16(row[r] + j);
  const v16 mean = reduce_rows(acc, add_v) / float(D);  // lane r: row r's
  for (v16& a : acc) a = v16{};
  for (int64_t j = 0; j < D; j += W)
    for (int r = 0; r < W; ++r) {
      const v16 d = load16(row[r] + j) - mean[r];
      acc[r] += d * d;
    }
  const v16 variance = reduce_rows(acc, add_v) / float(D);
  for (int r = 0; r < n; ++r) {
    // a variance past fp32's range gives NaN (the encoder's finite check names it), never a silent 0
    const float m = mean[r], rstd = std::isfinite(variance[r]) ? 1.0f / std::sqrt(variance[r] + eps) : NAN;
    T* out = y + r * ld_out;
    for (int64_t j = 0; j < D; j += W)
      store16((load16(row[r] + j) - m) * rstd * load16(gamma + j) + load16(beta + j), out + j);
  }
}

template <typename T>
int norm_rows(const T* x, int64_t ld_in, T* y, int64_t ld_out, const T* gamma, const T* beta, int64_t R, int64_t D,
              float eps, int threads) {
  if (D <= 0 || D % W) return 1;
  std::vector<float> g(D), b(D);  // widened once, read by every block
  for (int64_t j = 0; j < D; j += W) {
    store16(load16(gamma + j), g.data() + j);
    store16(load16(beta + j), b.data() + j);
  }
  const int64_t blocks = (R + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks >= 2 * threads)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t first = k * W;
    norm_block(x + first * ld_in, ld_in, y + first * ld_out, ld_out, g.data(), b.data(),
               int(std::min<int64_t>(W, R - first)), D, eps);
  }
  return 0;
}

}  // namespace

extern "C" {

// 1 where the library is built with AVX-512. Built for AVX2 alone, GCC's code for the 16-lane
// vectors is slow whatever the rows a block (1 to 16 measured), and PyTorch's LayerNorm is faster
// (480 rows of 384, one thread: 100 against 56 us in fp32, 92 against 87 in bf16), so the engine
// keeps PyTorch's there.
int ctxvec_layer_norm_fast() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// x: R rows of D values (row r at x + r · ld_in, values contiguous); y likewise; gamma, beta: D
// values. Returns 0, or 1 where D is not a positive multiple of 16.
int ctxvec_layer_norm_f32(const float* x, int64_t ld_in, float* y, int64_t ld_out, const float* gamma,
                          const float* beta, int64_t R, int64_t D, float eps, int threads) {
  return norm_rows(x, ld_in, y, ld_out, gamma, beta, R, D, eps, threads);
}

int ctxvec_layer_norm_bf16(const uint16_t* x, int64_t ld_in, uint16_t* y, int64_t ld_out, const uint16_t* gamma,
                           const uint16_t* beta, int64_t R, int64_t D, float eps, int threads) {
  return norm_rows(x, ld_in, y, ld_out, gamma, beta, R, D, eps, threads);
}

}
