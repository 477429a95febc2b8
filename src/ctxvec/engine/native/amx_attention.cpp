// Self-attention over packed rows in bf16 by AMX tiles (Intel Xeon from Sapphire Rapids on):
// the same contract as packed_attention.cpp's bf16 kernel, with the two matrix multiplies,
// Q·Kᵀ and P·V, on the CPU's tile matrix unit instead of 16-lane FMAs.
//
// A tile is up to 16 rows of 64 bytes; one TDPBF16PS multiplies a 16 x 32 bf16 tile by a
// 32 x 16 one, accumulating a 16 x 16 fp32 tile. The right-hand tile is laid out in pairs:
// its row r holds, for each of 16 columns, the two values of depth 2r and 2r + 1. So:
// - the queries are loaded as tiles straight from the QKV rows (16 rows, 32 dims a tile);
// - each block of 16 keys becomes, per 32 dims, a pair-tile by one 16 x 16 transpose of 32-bit
//   lanes (a key's dims 2r and 2r + 1 are one 32-bit lane);
// - each 32 keys of values become, per 16 dims, a pair-tile by interleaving two value rows;
// - the scores are stored from their tiles and put through the softmax in fp32 16-lane
//   vectors, a block's 16 rows at once (their maxima and sums each by one reduction, vec16.h),
//   e^x as 2^(x log2 e); the unnormalised probabilities, rounded to bf16, form P's tiles, as
//   PyTorch's fused CPU kernel rounds them for its second matrix multiply; the fp32 sums divide
//   the output, rounded to bf16 once.
//
// Numbers: products of bf16 values are exact in fp32 and the tiles accumulate in fp32, so Q·Kᵀ
// is the vector kernel's within fp32 rounding; P·V adds P's rounding to bf16, at most 2^-9 of
// the sum of P·|V| (tests/test_native.py bounds the whole).
//
// Tiles need the operating system's leave (arch_prctl ARCH_REQ_XCOMP_PERM, asked once here);
// where it is refused, or the library is built for a CPU without AMX, the entry point says so
// (3) and ctxvec.engine.native runs the vector kernel.
//
// Letters as in packed_attention.cpp: L a sequence's tokens, Dh head width, H heads, D = H * Dh.

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "vec16.h"

namespace {

using namespace ctxvec;
typedef uint16_t v32h __attribute__((vector_size(64)));

struct alignas(64) TileConfig {  // palette 1: every tile 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

bool permitted() {  // the tile data state, granted to the whole process once
  static const bool granted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return granted;
}

// One thread's tiles in memory, for heads of up to 64 dims and sequences of up to MAX_TOKENS.
struct Scratch {
  uint16_t keys[MAX_TOKENS / 16][2][16][32];    // [key block][32 dims][pair row][key, dim of pair]
  uint16_t values[MAX_TOKENS / 32][4][16][32];  // [32 keys][16 dims][pair row][dim, key of pair]
  uint16_t queries[16][64];                     // a last block of fewer than 16 queries, 0 past L
  float scores[16][MAX_TOKENS];
  uint16_t probabilities[16][MAX_TOKENS];
  float heads[16][64];
};

inline v16 bits(const uint16_t* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }  // 32 bf16 as they are
inline v32h halves(const uint16_t* p) { v32h v; std::memcpy(&v, p, sizeof v); return v; }

template <int Dh>
void attend_head(const uint16_t* q0, int64_t ld_in, int64_t D, uint16_t* o0, int64_t ld_out, int L, float scale,
                 Scratch& t) {
  constexpr int DQ = Dh / 32, DV = Dh / 16;  // tiles a query row spans; 16-dim tiles of a head
  const int NB = (L + 15) / 16, NK = (L + 31) / 32;  // blocks of 16 keys, of 32 keys
  const uint16_t* k0 = q0 + D;
  const uint16_t* v0 = q0 + 2 * D;
  for (int b = 0; b < NB; ++b)  // the keys as pair-tiles: one transpose of 32-bit lanes per 32 dims
    for (int c = 0; c < DQ; ++c) {
      v16 block[W];
      for (int i = 0; i < W; ++i) block[i] = b * W + i < L ? bits(k0 + (b * W + i) * ld_in + c * 32) : v16{};
      transpose(block);  // row r: each key's dims 2r and 2r + 1
      std::memcpy(t.keys[b][c], block, sizeof block);
    }
  const v32h first{0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const v32h second = first + 16;
  for (int k = 0; k < NK; ++k)  // the values as pair-tiles: rows 2r and 2r + 1 interleaved
    for (int r = 0; r < 16; ++r) {
      const int j = k * 32 + 2 * r;
      for (int c = 0; c < DQ; ++c) {
        const v32h a = j < L ? halves(v0 + j * ld_in + c * 32) : v32h{};
        const v32h b = j + 1 < L ? halves(v0 + (j + 1) * ld_in + c * 32) : v32h{};
        const v32h low = __builtin_shuffle(a, b, first), high = __builtin_shuffle(a, b, second);
        std::memcpy(t.values[k][2 * c][r], &low, sizeof low);
        std::memcpy(t.values[k][2 * c + 1][r], &high, sizeof high);
      }
    }
  for (int i0 = 0; i0 < L; i0 += 16) {
    const int rows = std::min(16, L - i0);
    const uint16_t* q = q0 + i0 * ld_in;
    int64_t q_stride = ld_in * 2;
    if (rows < 16) {  // a last block: its rows copied, 0 after them (no row past the sequence read)
      std::memset(t.queries, 0, sizeof t.queries);
      for (int r = 0; r < rows; ++r) std::memcpy(t.queries[r], q + r * ld_in, Dh * 2);
      q = t.queries[0], q_stride = sizeof t.queries[0];
    }
    // 1) Q·Kᵀ, a 16 x 16 tile of scores per key block
    _tile_loadd(0, q, q_stride);
    if (DQ == 2) _tile_loadd(1, q + 32, q_stride);
    for (int b = 0; b < NB; ++b) {
      _tile_zero(3);
      _tile_loadd(2, t.keys[b][0], 64);
      _tile_dpbf16ps(3, 0, 2);
      if (DQ == 2) {
        _tile_loadd(2, t.keys[b][1], 64);
        _tile_dpbf16ps(3, 1, 2);
      }
      _tile_stored(3, &t.scores[0][b * W], sizeof t.scores[0]);
    }
    // 2) softmax over the L keys in fp32, 16 rows at once (rows past L skipped: their P·V
    //    output is never stored); P unnormalised, in bf16, 0 past L up to NK * 32
    const v16i in_last = LANE + (NB - 1) * W < L;  // the last key block's lanes that are keys
    v16 row[W];
    for (int r = 0; r < W; ++r) {
      v16 m = r < rows ? load16(&t.scores[r][(NB - 1) * W]) : v16{};
      m = in_last ? m : splat(-INFINITY);
      for (int b = 0; b < NB - 1 && r < rows; ++b) m = max_v(m, load16(&t.scores[r][b * W]));
      row[r] = m;
    }
    const float to_exp2 = scale * LOG2_E;  // e^(x scale) = 2^(x scale log2 e)
    float shift[W], inverse_sum[W];
    store16(reduce_rows(row, max_v) * to_exp2, shift);  // each row's max, scaled
    for (int r = 0; r < W; ++r) {
      v16 total = splat(1.0f);
      if (r < rows) {
        const v16 c = splat(shift[r]);
        total = v16{};
        for (int b = 0; b < NB; ++b) {
          v16 e = exp2_nonpositive(load16(&t.scores[r][b * W]) * to_exp2 - c);
          if (b == NB - 1) e = in_last ? e : v16{};
          total += e;
          store16(e, &t.probabilities[r][b * W]);
        }
        if (NB & 1) store16(v16{}, &t.probabilities[r][NB * W]);
      }
      row[r] = total;
    }
    store16(1.0f / reduce_rows(row, add_v), inverse_sum);
    // 3) P·V: a 16 x 16 tile per 16 dims (rows past L are computed from stale P, never stored)
    _tile_zero(4);
    _tile_zero(5);
    if (DV == 4) {
      _tile_zero(6);
      _tile_zero(7);
    }
    for (int k = 0; k < NK; ++k) {
      _tile_loadd(0, &t.probabilities[0][k * 32], sizeof t.probabilities[0]);
      _tile_loadd(1, t.values[k][0], 64);
      _tile_dpbf16ps(4, 0, 1);
      _tile_loadd(2, t.values[k][1], 64);
      _tile_dpbf16ps(5, 0, 2);
      if (DV == 4) {
        _tile_loadd(1, t.values[k][2], 64);
        _tile_dpbf16ps(6, 0, 1);
        _tile_loadd(2, t.values[k][3], 64);
        _tile_dpbf16ps(7, 0, 2);
      }
    }
    _tile_stored(4, &t.heads[0][0], sizeof t.heads[0]);
    _tile_stored(5, &t.heads[0][16], sizeof t.heads[0]);
    if (DV == 4) {
      _tile_stored(6, &t.heads[0][32], sizeof t.heads[0]);
      _tile_stored(7, &t.heads[0][48], sizeof t.heads[0]);
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < DV; ++c)
        store16(load16(&t.heads[r][c * W]) * inverse_sum[r], o0 + (i0 + r) * ld_out + c * W);
  }
}

}  // namespace

extern "C" {

int ctxvec_amx_tiles() { return permitted(); }

// As ctxvec_packed_attention_bf16 (packed_attention.cpp); returns 3 where tiles are refused.
int ctxvec_packed_attention_bf16_amx(const uint16_t* qkv, int64_t ld_in, uint16_t* out, int64_t ld_out,
                                     const int64_t* starts, int64_t n_seq, int64_t H, int64_t Dh, float scale,
                                     int threads) {
  if (!permitted()) return 3;
  if (Dh != 32 && Dh != 64) return 1;
  for (int64_t s = 0; s < n_seq; ++s)
    if (starts[s + 1] < starts[s] || starts[s + 1] - starts[s] > MAX_TOKENS) return 2;
  const int64_t D = H * Dh;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    auto scratch = std::make_unique<Scratch>();
    const TileConfig config;
    _tile_loadconfig(&config);
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < n_seq * H; ++task) {
      const int64_t s = task / H, h = task % H, first = starts[s];
      const int L = int(starts[s + 1] - first);
      if (L == 0) continue;
      const uint16_t* q0 = qkv + first * ld_in + h * Dh;
      uint16_t* o0 = out + first * ld_out + h * Dh;
      if (Dh == 32) attend_head<32>(q0, ld_in, D, o0, ld_out, L, scale, *scratch);
      else attend_head<64>(q0, ld_in, D, o0, ld_out, L, scale, *scratch);
    }
    _tile_release();
  }
  return 0;
}

}

#else  // built for a CPU without AMX: the vector kernel runs

extern "C" {
int ctxvec_amx_tiles() { return 0; }
int ctxvec_packed_attention_bf16_amx(const uint16_t*, int64_t, uint16_t*, int64_t, const int64_t*, int64_t, int64_t,
                                     int64_t, float, int) {
  return 3;
}
}

#endif
