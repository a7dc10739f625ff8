// bfloat16 tile products on AVX512-BF16 (VDPBF16PS: 32 bf16 multiplies per instruction, float
// accumulation), for the forward of bfloat16 attention at the avx512 level on CPUs that have it
// (Zen 4/5, Cooper Lake, Sapphire Rapids and later), chosen at run time: the functions below carry
// their own target attribute, the rest of the level does not need the extension.
//
// Operands hold pairs of bf16 along the reduction dimension k, one pair per 32-bit word (the even k in
// the low half), which is the layout VDPBF16PS multiplies: A rows are plain bf16 rows (padded to an
// even length), B panels of kGemmN columns hold for each k pair a row of kGemmN words:
// word (k2, n) at B[(n / NR) * strip + k2 * NR + n % NR]. Accumulation is float; the float path
// (cpu/gemm.h) stays for everything else, and for calls whose V holds NaN/Inf (see the forward).
#pragma once

#include "cpu/gemm.h"
#include "cpu/pack.h"

#if ATTNOPS_X86_SIMD && ATTNOPS_VEC_BYTES == 64
#define ATTNOPS_BF16_DOT 1
#define ATTNOPS_BF16_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define ATTNOPS_BF16_DOT 0
#endif

namespace attnops::cpu::ATTNOPS_ISA {

// Two bf16 bit patterns as one word: lo (the even k) in the low half.
inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// B = src^T in word panels (K^T of a key range): word (d2, r) pairs src[r, 2 d2] and src[r, 2 d2 + 1]
// (0 past D). Rows [r0, r1) start on a panel boundary; `last`: r1 is the matrix's end, and the columns of the
// last panel past it are zeroed (every other word is written).
template <int NR>
inline void pack_transposed_pairs(const c10::BFloat16* src, int64_t stride, int64_t r0, int64_t r1, int64_t D,
                                  uint32_t* dst, bool last = false) {
  const int64_t D2 = (D + 1) / 2;
  for (int64_t p0 = r0; p0 < r1; p0 += NR) {
    uint32_t* panel = dst + (p0 / NR) * D2 * NR;
    const int64_t n = std::min<int64_t>(NR, r1 - p0);
    if (last && n < NR)
      for (int64_t d2 = 0; d2 < D2; ++d2) std::fill(panel + d2 * NR + n, panel + (d2 + 1) * NR, uint32_t(0));
    for (int64_t r = 0; r < n; ++r) {
      const c10::BFloat16* row = src + (p0 + r) * stride;
      if (p0 + r + kPrefetchRows < r1) prefetch_row(row + kPrefetchRows * stride, D);
      for (int64_t d2 = 0; d2 < D2; ++d2)
        panel[d2 * NR + r] = bf16_pair(row[2 * d2].x, 2 * d2 + 1 < D ? row[2 * d2 + 1].x : uint16_t(0));
    }
  }
}

// B = src in word panels over its rows (V of a key range): word (j2, d) pairs src[2 j2, d] and
// src[2 j2 + 1, d] (0 past Sk and past D); strip = ceil(Sk / 2) * NR. Rows [r0, r1) start even.
// Returns whether every element packed is finite (an all-ones bf16 exponent is Inf or NaN).
template <int NR>
inline bool pack_row_pairs(const c10::BFloat16* src, int64_t stride, int64_t r0, int64_t r1, int64_t Sk, int64_t D,
                           int64_t Dp, uint32_t* dst) {
  const int64_t strip = (Sk + 1) / 2 * NR;
  uint32_t special = 0;
  for (int64_t r = r0; r < r1; r += 2) {
    const c10::BFloat16* lo = src + r * stride;
    const c10::BFloat16* hi = r + 1 < Sk ? lo + stride : nullptr;
    if (r + kPrefetchRows + 1 < r1) {
      prefetch_row(lo + kPrefetchRows * stride, D);
      prefetch_row(lo + (kPrefetchRows + 1) * stride, D);
    }
    for (int64_t d = 0; d < Dp; ++d) {
      const uint16_t a = d < D ? lo[d].x : uint16_t(0), b = d < D && hi ? hi[d].x : uint16_t(0);
      special |= uint32_t((a & 0x7f80) == 0x7f80) | uint32_t((b & 0x7f80) == 0x7f80);
      dst[(d / NR) * strip + (r / 2) * NR + d % NR] = bf16_pair(a, b);
    }
  }
  return special == 0;
}

#if ATTNOPS_BF16_DOT

// C (MR x 2 vectors) (+)= A B over K2 word pairs, then C *= out_scale (scores: the softmax scale).
template <int MR>
ATTNOPS_BF16_TARGET inline void gemm_tile_bf16(int64_t K2, const uint32_t* A, int64_t lda2, const uint32_t* B,
                                                float* C, int64_t ldc, bool accumulate, const float* c_scale,
                                                float out_scale) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      const __m512 s = _mm512_set1_ps(c_scale ? c_scale[r] : 1.0f);
      c0[r] = _mm512_mul_ps(_mm512_loadu_ps(C + r * ldc), s);
      c1[r] = _mm512_mul_ps(_mm512_loadu_ps(C + r * ldc + 16), s);
    } else {
      c0[r] = _mm512_setzero_ps();
      c1[r] = _mm512_setzero_ps();
    }
  }
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + k2 * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + k2 * 32 + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * lda2 + k2]));
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
  const __m512 os = _mm512_set1_ps(out_scale);
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * ldc, _mm512_mul_ps(c0[r], os));
    _mm512_storeu_ps(C + r * ldc + 16, _mm512_mul_ps(c1[r], os));
  }
}

// C (M x N) (+)= A (M x 2 K2 bf16, row stride lda2 words) B (word panels, `strip` words apart),
// N a multiple of 32 (kGemmN<float> at this level).
ATTNOPS_BF16_TARGET inline void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2,
                                          const uint32_t* B, int64_t strip, float* C, int64_t ldc, bool accumulate,
                                          const float* c_scale = nullptr, float out_scale = 1.0f) {
  constexpr int NR = 32, MR = 8;
  static_assert(kGemmN<float> == NR, "the bf16 panels have the float panels' width");
  for (int64_t n = 0; n < N; n += NR) {
    const uint32_t* Bn = B + (n / NR) * strip;
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
      gemm_tile_bf16<MR>(K2, A + m * lda2, lda2, Bn, C + m * ldc + n, ldc, accumulate, c_scale ? c_scale + m : nullptr,
                         out_scale);
    for (; m < M; ++m)
      gemm_tile_bf16<1>(K2, A + m * lda2, lda2, Bn, C + m * ldc + n, ldc, accumulate, c_scale ? c_scale + m : nullptr,
                        out_scale);
  }
}

// dst[0, ceil(n / 2)) = the float row p[0, n) as bf16 pairs (round to nearest even), p read up to
// n rounded up to 32 (the tile's zero padding), the pair past an odd n completed by that padding.
ATTNOPS_BF16_TARGET inline void to_bf16_pairs(const float* p, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; j < n; j += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + j + 16), _mm512_loadu_ps(p + j));
    _mm512_storeu_si512(dst + j / 2, (__m512i)v);
  }
}

#else

// Declared only, so that the kernels call them under `if constexpr` without #if: at this level no
// call is ever instantiated (kBf16Dot is false), so none needs a definition.
void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda2, const uint32_t* B, int64_t strip,
               float* C, int64_t ldc, bool accumulate, const float* c_scale = nullptr, float out_scale = 1.0f);
void to_bf16_pairs(const float* p, int64_t n, uint32_t* dst);

#endif  // ATTNOPS_BF16_DOT

// Whether this level has the bf16 products (the kernels still check the CPU at run time: bf16_dot()).
inline constexpr bool kBf16Dot = ATTNOPS_BF16_DOT;

}  // namespace attnops::cpu::ATTNOPS_ISA
