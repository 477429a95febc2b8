// Self-attention over packed rows: softmax(Q·Kᵀ / √Dh) · V for every head of every sequence,
// reading Q, K and V straight from the fused QKV projection's rows and writing the heads,
// concatenated, straight into the output projection's input rows.
//
// The engine packs a batch's real tokens as rows (engine/packing.py); a sequence's tokens are
// consecutive rows, sequence s owning rows starts[s] .. starts[s + 1] - 1. Attention is the one
// step that needs the sequences apart; PyTorch's kernels want them padded to (B, H, T, Dh), so
// the Python route gathers the rows into that layout, attends with a mask, and gathers them
// back. Here each sequence attends over its own rows: no padding, no mask, no gathers, and the
// scores stay in fp32 registers. For the short sequences of text this is 2.2-8x (fp32) and 2.4-2.8x
// (bf16) faster than those steps on an AMX Xeon (one thread; engine/attention.py has the figures and the rule);
// ctxvec.engine.native compiles it for the CPU at hand.
//
// Numbers: Q·Kᵀ, softmax and P·V in fp32 whatever the input (bf16 inputs widened exactly, the
// output rounded to bf16 once, to nearest even); e^x as 2^(x log2 e), ~1 ulp (vec16.h).
// Written with GCC/Clang vector extensions (vec16.h: slow without AVX-512, so the route's rule,
// engine/attention.py, takes it only on CPUs where it is measured faster).
//
// Letters: L a sequence's tokens, Lp L rounded up to W, Dh head width, H heads, D = H * Dh,
// NB key blocks of W (Lp / W), RB query rows computed together.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec16.h"

namespace {

using namespace ctxvec;
constexpr int MAX_BLOCKS = MAX_TOKENS / W;  // key blocks of the longest sequence

// One head of one sequence. kt: its keys transposed, (Dh, Lp) fp32, zero past L; vv: its values,
// (L, Dh) fp32; q0 / out0: its first query row / output row; p: scratch for RB rows of Lp.
template <typename T, int NB, int RB, int Dh>
void attend_head(const T* q0, int64_t ld_in, T* out0, int64_t ld_out, int L, float scale,
                 const float* kt, int Lp, const float* vv, float* p) {
  constexpr int DV = Dh / W;
  for (int i0 = 0; i0 < L; i0 += RB) {
    const int rows = std::min(RB, L - i0);
    // 1) scores of RB queries against every key: Q·Kᵀ / √Dh, in registers
    float q[RB][Dh];
    for (int r = 0; r < RB; ++r) {  // a block's last rows repeat its last query (not stored)
      const T* src = q0 + (i0 + std::min(r, rows - 1)) * ld_in;
      for (int c = 0; c < DV; ++c) store16(load16(src + c * W) * scale, q[r] + c * W);
    }
    v16 s[RB][NB];
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < NB; ++b) s[r][b] = v16{};
    for (int d = 0; d < Dh; ++d) {
      const float* krow = kt + d * Lp;
      for (int b = 0; b < NB; ++b) {
        const v16 k = load16(krow + b * W);
        for (int r = 0; r < RB; ++r) s[r][b] += q[r][d] * k;
      }
    }
    // 2) softmax over the L keys (the block's lanes past L are no keys)
    float inverse_sum[RB];
    for (int r = 0; r < RB; ++r) {
      v16 m = splat(-INFINITY);
      for (int b = 0; b < NB; ++b) {
        s[r][b] = LANE + b * W < L ? s[r][b] : splat(-INFINITY);
        m = s[r][b] > m ? s[r][b] : m;
      }
      const float row_max = max_of(m);
      v16 total = v16{};
      for (int b = 0; b < NB; ++b) {
        v16 e = exp2_nonpositive((s[r][b] - row_max) * LOG2_E);
        e = LANE + b * W < L ? e : v16{};
        total += e;
        store16(e, p + r * Lp + b * W);
      }
      inverse_sum[r] = 1.0f / sum_of(total);
    }
    // 3) P·V, normalised at the end
    v16 o[RB][DV];
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < DV; ++c) o[r][c] = v16{};
    for (int j = 0; j < L; ++j) {
      const float* vrow = vv + j * Dh;
      for (int c = 0; c < DV; ++c) {
        const v16 v = load16(vrow + c * W);
        for (int r = 0; r < RB; ++r) o[r][c] += p[r * Lp + j] * v;
      }
    }
    for (int r = 0; r < rows; ++r) {
      T* dst = out0 + (i0 + r) * ld_out;
      for (int c = 0; c < DV; ++c) store16(o[r][c] * inverse_sum[r], dst + c * W);
    }
  }
}

// The query rows computed together, by key blocks: as many as keep the scores in registers.
// (A kernel for NB blocks reads blocks past Lp / W from the buffers: finite, and masked.)
template <typename T, int Dh>
void attend_head_blocks(int blocks, const T* q0, int64_t ld_in, T* o0, int64_t ld_out, int L, float scale,
                        const float* kt, int Lp, const float* vv, float* p) {
  switch (blocks) {
    case 1: attend_head<T, 1, 8, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    case 2: attend_head<T, 2, 8, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    case 3: attend_head<T, 3, 4, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    case 4: attend_head<T, 4, 4, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    case 5: case 6: attend_head<T, 6, 2, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    case 7: case 8: attend_head<T, 8, 2, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    case 9: case 10: case 11: case 12: attend_head<T, 12, 1, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
    default: attend_head<T, MAX_BLOCKS, 1, Dh>(q0, ld_in, o0, ld_out, L, scale, kt, Lp, vv, p); break;
  }
}

template <typename T>
int attend(const T* qkv, int64_t ld_in, T* out, int64_t ld_out, const int64_t* starts, int64_t n_seq,
           int64_t H, int64_t Dh, float scale, int threads) {
  if (Dh != 32 && Dh != 64) return 1;
  for (int64_t s = 0; s < n_seq; ++s)
    if (starts[s + 1] < starts[s] || starts[s + 1] - starts[s] > MAX_TOKENS) return 2;
  const int64_t D = H * Dh;
  // one (sequence, head) pair a task; each thread keeps its own buffers
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> kt(Dh * MAX_BLOCKS * W), vv(MAX_BLOCKS * W * Dh), p(8 * MAX_BLOCKS * W);
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < n_seq * H; ++task) {
      const int64_t s = task / H, h = task % H, first = starts[s];
      const int L = int(starts[s + 1] - first), Lp = (L + W - 1) / W * W;
      if (L == 0) continue;  // a row of the batch with no real token
      for (int j = 0; j < L; ++j) {  // this head's values, in fp32
        const T* row = qkv + (first + j) * ld_in + 2 * D + h * Dh;
        for (int c = 0; c < Dh / W; ++c) store16(load16(row + c * W), vv.data() + j * Dh + c * W);
      }
      for (int j0 = 0; j0 < L; j0 += W)  // its keys, transposed 16 x 16 at a time (0 past L)
        for (int c = 0; c < Dh / W; ++c) {
          v16 block[W];
          for (int i = 0; i < W; ++i)
            block[i] = j0 + i < L ? load16(qkv + (first + j0 + i) * ld_in + D + h * Dh + c * W) : v16{};
          transpose(block);
          for (int i = 0; i < W; ++i) store16(block[i], kt.data() + (c * W + i) * Lp + j0);
        }
      const T* q0 = qkv + first * ld_in + h * Dh;
      T* o0 = out + first * ld_out + h * Dh;
      if (Dh == 32) attend_head_blocks<T, 32>(Lp / W, q0, ld_in, o0, ld_out, L, scale, kt.data(), Lp, vv.data(), p.data());
      else attend_head_blocks<T, 64>(Lp / W, q0, ld_in, o0, ld_out, L, scale, kt.data(), Lp, vv.data(), p.data());
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// qkv: rows of [Q | K | V], each H heads of Dh values, row stride ld_in (elements); out: rows of
// H * Dh values, row stride ld_out; starts: n_seq + 1 row offsets (non-decreasing). Returns 0,
// or 1 for a head width other than 32 or 64, 2 for a sequence of more than MAX_TOKENS tokens.
int ctxvec_packed_attention_f32(const float* qkv, int64_t ld_in, float* out, int64_t ld_out, const int64_t* starts,
                                int64_t n_seq, int64_t H, int64_t Dh, float scale, int threads) {
  return attend(qkv, ld_in, out, ld_out, starts, n_seq, H, Dh, scale, threads);
}

int ctxvec_packed_attention_bf16(const uint16_t* qkv, int64_t ld_in, uint16_t* out, int64_t ld_out,
                                 const int64_t* starts, int64_t n_seq, int64_t H, int64_t Dh, float scale,
                                 int threads) {
  return attend(qkv, ld_in, out, ld_out, starts, n_seq, H, Dh, scale, threads);
}

int ctxvec_packed_attention_max_tokens() { return MAX_TOKENS; }

}
