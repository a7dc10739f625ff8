// bfloat16 tile products on AVX512-BF16 (VDPBF16PS: 32 bf16 multiplies per instruction, float
// accumulation), for the forward and backward of bfloat16 attention at the avx512 level on CPUs that have it
// (Zen 4/5, Cooper Lake, Sapphire Rapids and later), chosen at run time: the functions below carry
// their own target attribute, the rest of the level does not need the extension.
//
// Operands hold pairs of bf16 along the reduction dimension k, one pair per 32-bit word (the even k in
// the low half), which is the layout VDPBF16PS multiplies: A rows are plain bf16 rows (padded to an
// even length), B panels of kGemmN columns hold for each k pair a row of kGemmN words:
// word (k2, n) at B[(n / NR) * strip + k2 * NR + n % NR]. Accumulation is float; the float path
// (cpu/gemm.h) stays for everything else, for forwards whose V holds NaN/Inf and for backwards whose q, k or
// dO do (see the kernels).
#pragma once

#include "cpu/gemm.h"
#include "cpu/pack.h"
#include "cpu/softmax.h"

#if ATTNOPS_X86_SIMD && ATTNOPS_VEC_BYTES == 64
#define ATTNOPS_BF16_DOT 1
#define ATTNOPS_BF16_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define ATTNOPS_BF16_DOT 0
#endif

namespace attnops::cpu::ATTNOPS_ISA {

// Two bf16 bit patterns as one word: lo (the even k) in the low half.
inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// The word offset of column `col` in a pair layout of `rows` rows stored in blocks of `ld` columns, block after
// block (each rows x ld words): the 32-word panels of gemm_bf16 (ld = 32), or one VNNI block whose rows hold every
// column (ld >= the width: the amx level's layout, where brgemm multiplies a whole key tile in one call). The two
// agree where the width is 32, so ld = 32 names the panels everywhere.
inline int64_t pair_column(int64_t col, int64_t rows, int64_t ld) { return (col / ld) * rows * ld + col % ld; }

// B = src^T in word panels (K^T of a key range): word (d2, r) pairs src[r, 2 d2] and src[r, 2 d2 + 1]
// (0 past D). Rows [r0, r1) start on a panel boundary; `last`: r1 is the matrix's end, and the columns of the
// last panel past it are zeroed (every other word is written). ld: the layout's block width (pair_column).
template <int NR>
inline void pack_transposed_pairs(const c10::BFloat16* src, int64_t stride, int64_t r0, int64_t r1, int64_t D,
                                  uint32_t* dst, bool last = false, int64_t ld = NR) {
  const int64_t D2 = (D + 1) / 2;
  if constexpr (NR == 1) {
    if (ld == 1) {  // row r's D2 words at r D2: its bf16 pairs as stored (lo = the even element), a copy per row
      for (int64_t r = r0; r < r1; ++r) {
        const c10::BFloat16* src_row = src + r * stride;
        uint32_t* row = dst + r * D2;
        std::memcpy(row, src_row, static_cast<size_t>(D / 2) * sizeof(uint32_t));
        if (D % 2) row[D2 - 1] = bf16_pair(src_row[D - 1].x, uint16_t(0));
      }
      return;
    }
  }
  for (int64_t p0 = r0; p0 < r1; p0 += NR) {
    uint32_t* panel = dst + pair_column(p0, D2, ld);
    const int64_t n = std::min<int64_t>(NR, r1 - p0);
    if (last && n < NR)
      for (int64_t d2 = 0; d2 < D2; ++d2) std::fill(panel + d2 * ld + n, panel + d2 * ld + NR, uint32_t(0));
    int64_t r = 0;
    constexpr int W = Vec<float>::size;
    if constexpr (NR % W == 0) {
      // a row's words are its bf16 pairs as stored (lo = the even element), so W x W blocks of 32-bit words
      // transpose as float lanes do (pack_transposed_panels; the shuffles move bits, never read them as floats)
      const int64_t full = D / 2 / W * W;  // words of whole pairs, in blocks of W
      for (; r + W <= n; r += W) {
        const c10::BFloat16* rows = src + (p0 + r) * stride;
        const int64_t ahead = std::min<int64_t>(W, r1 - (p0 + r + W));
        for (int64_t d2 = 0; d2 < full; d2 += W)  // vload / vstore copy bytes: the words pass as they are
          transpose_block<NR, false>(rows, stride, 2 * d2, ahead, vec_t<float>{},
                                     reinterpret_cast<float*>(panel + d2 * ld + r), ld);
        for (int64_t d2 = full; d2 < D2; ++d2)
          for (int x = 0; x < W; ++x) {
            const c10::BFloat16* row_x = rows + x * stride;
            panel[d2 * ld + r + x] =
                bf16_pair(row_x[2 * d2].x, 2 * d2 + 1 < D ? row_x[2 * d2 + 1].x : uint16_t(0));
          }
      }
    }
    for (; r < n; ++r) {
      const c10::BFloat16* src_row = src + (p0 + r) * stride;
      if (p0 + r + kPrefetchRows < r1) prefetch_row(src_row + kPrefetchRows * stride, D);
      for (int64_t d2 = 0; d2 < D2; ++d2)
        panel[d2 * ld + r] = bf16_pair(src_row[2 * d2].x, 2 * d2 + 1 < D ? src_row[2 * d2 + 1].x : uint16_t(0));
    }
  }
}

#if ATTNOPS_BF16_DOT
// B = src in word panels over its rows (V of a key range): word (j2, d) pairs src[2 j2, d] and
// src[2 j2 + 1, d] (0 past Sk and past D); strip = ceil(Sk / 2) * NR. Rows [r0, r1) start even. ld: the layout's
// block width (pair_column; a multiple of NR: NR, or >= Dp for one block).
// Returns whether every element packed is finite (an all-ones bf16 exponent is Inf or NaN).
// With AVX512-BW: two rows interleaved 32 columns (a panel row) at a time by VPERMT2W; a scalar loop per element
// dominated decode's P V tiles.
template <int NR>
inline bool pack_row_pairs(const c10::BFloat16* src, int64_t stride, int64_t r0, int64_t r1, int64_t Sk, int64_t D,
                           int64_t Dp, uint32_t* dst, int64_t ld = NR) {
  static_assert(NR == 32, "a panel row is one pair of 16-word stores");
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  const __m512i exponent = _mm512_set1_epi16(0x7f80);
  const int64_t Sk2 = (Sk + 1) / 2;
  __mmask32 special = 0;
  for (int64_t r = r0; r < r1; r += 2) {
    const c10::BFloat16* lo = src + r * stride;
    const c10::BFloat16* hi = r + 1 < Sk ? lo + stride : nullptr;
    if (r + kPrefetchRows + 1 < r1) {
      prefetch_row(lo + kPrefetchRows * stride, D);
      prefetch_row(lo + (kPrefetchRows + 1) * stride, D);
    }
    for (int64_t d = 0; d < Dp; d += NR) {
      uint32_t* out = dst + pair_column(d, Sk2, ld) + (r / 2) * ld;
      const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : D > d ? (__mmask32(1) << (D - d)) - 1 : 0;
      const __m512i a = _mm512_maskz_loadu_epi16(m, lo + d);
      const __m512i b = hi ? _mm512_maskz_loadu_epi16(m, hi + d) : _mm512_setzero_si512();
      special |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(a, exponent), exponent) |
                 _mm512_cmpeq_epi16_mask(_mm512_and_si512(b, exponent), exponent);
      _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi16(a, high, b));
    }
  }
  return special == 0;
}
#else
template <int NR>  // declared only: called under `if constexpr (kDotFor<S>)`, never instantiated at this level
bool pack_row_pairs(const c10::BFloat16* src, int64_t stride, int64_t r0, int64_t r1, int64_t Sk, int64_t D,
                    int64_t Dp, uint32_t* dst, int64_t ld = NR);
#endif

#if ATTNOPS_BF16_DOT

// C (MR x NV vectors) = out_scale (c_scale C + A B) with accumulate, else out_scale A B; A B over K2 word pairs
// (out_scale: the scores' softmax scale). NV: 2 (a whole word panel) or 1 (its first 16 columns, the last panel
// of an N that is an odd multiple of 16).
// TransA: A given by columns, word (m, k2) at A[k2 * lda2 + m] (the backward's dS, made from dS^T).
template <int MR, bool TransA = false, int NV = 2>
ATTNOPS_BF16_TARGET inline void gemm_tile_bf16(int64_t K2, const uint32_t* A, int64_t lda2, const uint32_t* B,
                                                float* C, int64_t ldc, bool accumulate, const float* c_scale,
                                                float out_scale) {
  static_assert(NV == 1 || NV == 2);
  __m512 c[NV][MR];
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x) c[x][r] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh b[NV];
    for (int x = 0; x < NV; ++x) b[x] = (__m512bh)_mm512_loadu_si512(B + k2 * 32 + 16 * x);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(TransA ? A[k2 * lda2 + r] : A[r * lda2 + k2]));
      for (int x = 0; x < NV; ++x) c[x][r] = _mm512_dpbf16_ps(c[x][r], a, b[x]);
    }
  }
  // C added once, after the product (two-level summation, as gemm.h's tile): os (s C + A B)
  const __m512 os = _mm512_set1_ps(out_scale);
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(c_scale ? c_scale[r] : 1.0f);
    for (int x = 0; x < NV; ++x) {
      __m512 out = c[x][r];
      if (accumulate) out = _mm512_fmadd_ps(_mm512_loadu_ps(C + r * ldc + 16 * x), s, out);
      _mm512_storeu_ps(C + r * ldc + 16 * x, _mm512_mul_ps(out, os));
    }
  }
}

// The rows of one word panel (NV vectors of its columns).
template <bool TransA, int NV>
ATTNOPS_BF16_TARGET inline void gemm_panel_bf16(int64_t M, int64_t K2, const uint32_t* A, int64_t lda2,
                                                const uint32_t* B, float* C, int64_t ldc, bool accumulate,
                                                const float* c_scale, float out_scale) {
  constexpr int MR = 8;
  auto a_rows = [&](int64_t m) { return TransA ? A + m : A + m * lda2; };
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_tile_bf16<MR, TransA, NV>(K2, a_rows(m), lda2, B, C + m * ldc, ldc, accumulate,
                                   c_scale ? c_scale + m : nullptr, out_scale);
  for (; m < M; ++m)
    gemm_tile_bf16<1, TransA, NV>(K2, a_rows(m), lda2, B, C + m * ldc, ldc, accumulate,
                                  c_scale ? c_scale + m : nullptr, out_scale);
}

// C (M x N) (+)= A (M x 2 K2 bf16, row stride lda2 words) B (word panels, `strip` words apart), N a multiple of 16
// (a last half panel runs the one-vector tile, as the float gemm does). TransA: as gemm_tile_bf16.
template <bool TransA = false>
ATTNOPS_BF16_TARGET inline void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2,
                                          const uint32_t* B, int64_t strip, float* C, int64_t ldc, bool accumulate,
                                          const float* c_scale = nullptr, float out_scale = 1.0f) {
  constexpr int NR = 32;
  static_assert(kGemmN<float> == NR, "the bf16 panels have the float panels' width");
  for (int64_t n = 0; n < N; n += NR) {
    const uint32_t* Bn = B + (n / NR) * strip;
    if (n + NR <= N)
      gemm_panel_bf16<TransA, 2>(M, K2, A, lda2, Bn, C + n, ldc, accumulate, c_scale, out_scale);
    else
      gemm_panel_bf16<TransA, 1>(M, K2, A, lda2, Bn, C + n, ldc, accumulate, c_scale, out_scale);
  }
}

// C (M x N, ldc) (+)= A B through oneDNN's brgemm (at::native::cpublas::brgemm, the amx level: AMX tiles where the
// CPU has them, AVX-512 code elsewhere), B one VNNI block: A's rows are bf16 (two a word, lda2 words apart) read from
// element a0 (even) on, B holds K2 rows of N words (ldb words apart), each word a pair along the reduction. A word
// panel of gemm_bf16 is such a block (ld_b = 32), and so are the fused backward's dS^T pairs (dq^T = K^T dS^T).
ATTNOPS_BF16_TARGET inline void brgemm_bf16_block(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2,
                                                  int64_t a0, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                                  bool accumulate = false) {
  if (M <= 0 || N <= 0) return;
  at::native::cpublas::brgemm(M, N, 2 * K2, 2 * lda2, ldb, ldc, accumulate,
                              reinterpret_cast<const at::BFloat16*>(A) + a0, reinterpret_cast<const at::BFloat16*>(B),
                              C, /*is_vnni=*/true);
}

// gemm_bf16 (TransA false) through brgemm_bf16_block: B's columns in blocks of ldb words a row, `strip` words
// apart: one call per 32-column panel of gemm_bf16's layout (ldb = 32), one call in all where B is one VNNI block
// (ldb >= N: the forward's and backward's layouts at the amx level, pack_*_pairs with ld; a call costs ~1-3 us
// whatever its size, and per-panel calls were 40x SDPA's count). brgemm only adds, so c_scale and out_scale are
// passes over C around the calls. Its kernels are generated per shape and cached per thread: M is a tile's live
// rows, K the head dim or a key tile's (full but at the sequence's end), so a call meets a few dozen shapes.
ATTNOPS_BF16_TARGET inline void brgemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2,
                                            const uint32_t* B, int64_t strip, float* C, int64_t ldc, bool accumulate,
                                            const float* c_scale = nullptr, float out_scale = 1.0f,
                                            int64_t ldb = 32) {
  if (M <= 0) return;
  auto scale_rows = [&](auto scale_of) {
    for (int64_t m = 0; m < M; ++m) {
      const __m512 s = _mm512_set1_ps(scale_of(m));
      float* row = C + m * ldc;
      for (int64_t n = 0; n < N; n += 16) _mm512_storeu_ps(row + n, _mm512_mul_ps(_mm512_loadu_ps(row + n), s));
    }
  };
  if (accumulate && c_scale) scale_rows([&](int64_t m) { return c_scale[m]; });
  for (int64_t n = 0; n < N; n += ldb)  // a last half panel as a 16-column block (its words keep the panel's stride)
    brgemm_bf16_block(M, std::min<int64_t>(ldb, N - n), K2, A, lda2, 0, B + (n / ldb) * strip, ldb, C + n, ldc,
                      accumulate);
  if (out_scale != 1.0f) scale_rows([&](int64_t) { return out_scale; });
}

// K^T as bf16 rows: dst row d (ld2 words, two halves each) holds src[0..rows, d], zero-completed to an even count.
inline void pack_transposed_rows(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t D, int64_t ld2,
                                 uint32_t* dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t d = 0; d < D; ++d) {
    uint16_t* row = out + d * 2 * ld2;
    for (int64_t j = 0; j < rows; ++j) row[j] = src[j * stride + d].x;
    if (rows % 2) row[rows] = 0;
  }
}

// gemm_bf16 (A by rows) or, where `brgemm` (bf16_brgemm(): the amx level), brgemm_bf16: the same product. A task
// that multiplied through brgemm ends with at::native::cpublas::brgemm_release() (hands back the AMX tile state).
// ldb: brgemm_bf16's (the level's own kernel reads 32-word panels only).
ATTNOPS_BF16_TARGET inline void gemm_bf16_via(bool brgemm, int64_t M, int64_t N, int64_t K2, const uint32_t* A,
                                              int64_t lda2, const uint32_t* B, int64_t strip, float* C, int64_t ldc,
                                              bool accumulate, const float* c_scale = nullptr, float out_scale = 1.0f,
                                              int64_t ldb = 32) {
  if (brgemm) brgemm_bf16(M, N, K2, A, lda2, B, strip, C, ldc, accumulate, c_scale, out_scale, ldb);
  else gemm_bf16(M, N, K2, A, lda2, B, strip, C, ldc, accumulate, c_scale, out_scale);
}

// dst[0, ceil(n / 2)) = the float row p[0, n) as bf16 pairs (round to nearest even), p read up to
// n rounded up to 16 (the tile row's padding, zero after the softmax), the pair past an odd n completed by it.
ATTNOPS_BF16_TARGET inline void to_bf16_pairs(const float* p, int64_t n, uint32_t* dst) {
  int64_t j = 0;
  for (; j + 16 < n; j += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + j + 16), _mm512_loadu_ps(p + j));
    _mm512_storeu_si512(dst + j / 2, (__m512i)v);
  }
  if (j < n)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + j)));
}

// softmax_row on the rows [0, rows) of a tile of unscaled scores (s, lds floats a row; the tile's padded width n)
// whose scale c > 0 (softmax_scale log2(e)) multiplies in the exponent, P written as bf16 pairs along the keys to
// dst (ldd words a row, n / 2 of them written: zeros outside the span) and not back to s: the bf16 products' step
// where nothing reads P in float (no block map, no dropout). It spares the pass that scaled the scores (brgemm only
// adds) and the one that converted P (to_bf16_pairs), and takes the running max, alpha and sum of 16 rows at a
// time in vectors: per row, the scalar exp2 and its setup were a sixth of the step on a 256-key tile, and the
// rows' max and sum reductions (hmax, hsum) half of it on the 64-key tiles of block masks (Xeon with AMX).
// max(s) c is max(s c) (rounding is monotonic): m, l, alpha and P are softmax_row_exp<float, true>'s, bit for bit.
// `row_max` (the modifiers' step): the rows' scores are final (scaled, modified and masked by modify_mask_max) and
// these are their maxima; c is then not applied.
ATTNOPS_BF16_TARGET inline void softmax_rows_to_bf16(float* s, int64_t lds, int64_t rows, int64_t n,
                                                     const RowSpan* spans, float c, float* m, float* l, float* alpha,
                                                     uint32_t* dst, int64_t ldd, const float* row_max = nullptr) {
  using V = vec_t<float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 cv = _mm512_set1_ps(c), ninf = _mm512_set1_ps(kNegInf);
  for (int64_t g = 0; g < rows; g += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - g);
    const __mmask16 live = __mmask16((1u << nr) - 1);
    const __m512 mt = row_max ? _mm512_maskz_loadu_ps(live, row_max + g)
                              : _mm512_mul_ps((__m512)rows_max(s + g * lds, lds, nr, n, spans + g), cv);
    // m_new = max(m, tile max), NaN-propagating as softmax_row; alpha = exp2(m - m_new), 1 where m_new is -inf
    const __m512 mo = _mm512_maskz_loadu_ps(live, m + g);
    const __mmask16 nan_t = _mm512_cmp_ps_mask(mt, mt, _CMP_UNORD_Q), up = _mm512_cmp_ps_mask(mo, mt, _CMP_LT_OQ);
    const __m512 mn = _mm512_mask_blend_ps(nan_t | up, mo, mt);
    const __mmask16 none = _mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ);
    const __m512 al = _mm512_mask_blend_ps(none, (__m512)exp2((V)_mm512_sub_ps(mo, mn)), _mm512_set1_ps(1.0f));
    alignas(64) float m_new[16];
    _mm512_store_ps(m_new, mn);
    _mm512_mask_storeu_ps(alpha + g, live, al);
    __mmask16 updated = 0;  // the rows whose m and l take this tile
    V lanes[16];  // the rows' sums, lane by lane
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = g + i;
      uint32_t* out = dst + r * ldd;
      lanes[i] = V{};
      if (spans[r].empty() || m_new[i] == kNegInf) {  // the latter: only -inf scores so far
        std::fill(out, out + n / 2, uint32_t(0));
        continue;
      }
      updated |= __mmask16(1u << i);
      const V mv = vsplat(m_new[i]);
      const float* row = s + r * lds;
      // exp2_bf16p(s c - m) as softmax_row_exp<float, true> computes it from the scaled scores: the product rounded
      // on its own (an intrinsic with its rounding mode, which the compiler does not fuse into an FMA) and the sum in
      // the same order, so that P, l and the output are bit for bit those of the path a block map or dropout takes
      auto p_at = [&](int64_t col) {
        if (row_max) return exp2_bf16p(vload(row + col) - mv);
        return exp2_bf16p((V)_mm512_mul_round_ps(_mm512_loadu_ps(row + col), cv, _MM_FROUND_TO_NEAREST_INT |
                                                 _MM_FROUND_NO_EXC) - mv);
      };
      V sum{};
      int64_t j = 0;
      for (; j + 32 <= n; j += 32) {
        const V p0 = p_at(j), p1 = p_at(j + 16);
        sum += p0;
        sum += p1;
        _mm512_storeu_si512(out + j / 2, (__m512i)_mm512_cvtne2ps_pbh((__m512)p1, (__m512)p0));
      }
      if (j < n) {  // n is a multiple of 16
        const V p0 = p_at(j);
        sum += p0;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j / 2), (__m256i)_mm512_cvtneps_pbh((__m512)p0));
      }
      lanes[i] = sum;
    }
    for (int64_t i = nr; i < 16; ++i) lanes[i] = V{};
    // l alpha + sum written as softmax_row's `l * alpha + hsum(sum)`, so that the compiler contracts both alike
    const V lt = hreduce_rows<float>(lanes, [](V a, V b) { return a + b; });
    const V lo = (V)_mm512_maskz_loadu_ps(updated, l + g);
    _mm512_mask_storeu_ps(l + g, updated, (__m512)(lo * (V)al + lt));
    _mm512_mask_storeu_ps(m + g, updated, mn);
  }
}

// dst[0, n) = the float rows lo, hi [0, n) as bf16 pairs, word i = (lo[i], hi[i]) (round to nearest even; a
// null row reads as zeros), n a multiple of 16: two rows of dS^T become a row of dS's pairs along the keys.
ATTNOPS_BF16_TARGET inline void to_bf16_pair_columns(const float* lo, const float* hi, int64_t n, uint32_t* dst) {
  auto half = [](const float* row, int64_t i) {  // 16 floats -> 16 bf16 in the low halves of 16 words
    return row ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + i))) : _mm512_setzero_si512();
  };
  for (int64_t i = 0; i < n; i += 16)
    _mm512_storeu_si512(dst + i, _mm512_or_si512(half(lo, i), _mm512_slli_epi32(half(hi, i), 16)));
}

#else

// Declared only, so that the kernels call them under `if constexpr` without #if: at this level no
// call is ever instantiated (kBf16Dot is false), so none needs a definition.
template <bool TransA = false>
void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2, const uint32_t* B, int64_t strip,
               float* C, int64_t ldc, bool accumulate, const float* c_scale = nullptr, float out_scale = 1.0f);
void brgemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2, const uint32_t* B, int64_t strip,
                 float* C, int64_t ldc, bool accumulate, const float* c_scale = nullptr, float out_scale = 1.0f,
                 int64_t ldb = 32);
void gemm_bf16_via(bool brgemm, int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2, const uint32_t* B,
                   int64_t strip, float* C, int64_t ldc, bool accumulate, const float* c_scale = nullptr,
                   float out_scale = 1.0f, int64_t ldb = 32);
void brgemm_bf16_block(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2, int64_t a0, const uint32_t* B,
                       int64_t ldb, float* C, int64_t ldc, bool accumulate = false);
void pack_transposed_rows(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t D, int64_t ld2,
                          uint32_t* dst);
void to_bf16_pairs(const float* p, int64_t n, uint32_t* dst);
void softmax_rows_to_bf16(float* s, int64_t lds, int64_t rows, int64_t n, const RowSpan* spans, float c, float* m,
                          float* l, float* alpha, uint32_t* dst, int64_t ldd, const float* row_max = nullptr);
void to_bf16_pair_columns(const float* lo, const float* hi, int64_t n, uint32_t* dst);

#endif  // ATTNOPS_BF16_DOT

// Whether this level has the bf16 products (the kernels still check the CPU at run time: bf16_dot()).
inline constexpr bool kBf16Dot = ATTNOPS_BF16_DOT;

// Whether inputs of type S multiply their tiles in bf16 at this level (bf16_dot() is the run-time switch and the
// CPU check).
template <typename S>
inline constexpr bool kDotFor = kBf16Dot && std::is_same_v<S, c10::BFloat16>;

}  // namespace attnops::cpu::ATTNOPS_ISA
