// Converting and packing operands into the compute type (float, or double for float64 inputs).
//
// Kernels pack K/V (and Q/dO in the backward) once per call into zero-padded GEMM panels: that
// converts half/bfloat16 once instead of once per tile and lets the micro-kernel stream its B
// operand. Cost O(S * D) against the O(Sq * Sk * D) of the attention itself.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if ATTNOPS_X86_SIMD
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/vec.h"

namespace attnops::cpu::ATTNOPS_ISA {

template <typename S>
struct compute_type {
  using type = float;
};
template <>
struct compute_type<double> {
  using type = double;
};
template <typename S>
using compute_t = typename compute_type<S>::type;

// Vec<T>::size consecutive elements of src as a vector of the compute type: bfloat16 widens with a
// shift, float16 with F16C (AVX2 and AVX-512 levels), anything else lane by lane.
template <typename T, typename S>
inline vec_t<T> load_vec(const S* src) {
  if constexpr (std::is_same_v<S, T>) {
    return vload(src);
#if ATTNOPS_X86_SIMD
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float> && kVectorBytes == 32) {
    // one vpmovzxwd ymm: the vector-extension form below compiles to two 128-bit halves + insert
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return (vec_t<float>)_mm256_slli_epi32(wide, 16);
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float> && kVectorBytes == 64) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    return (vec_t<float>)_mm512_slli_epi32(wide, 16);
#endif
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>) {
    typedef uint16_t raw_t __attribute__((vector_size(kVectorBytes / 2)));
    raw_t raw;
    std::memcpy(&raw, src, sizeof(raw));
    return (vec_t<float>)(__builtin_convertvector(raw, Vec<float>::itype) << 16);
#if ATTNOPS_X86_SIMD
  } else if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<T, float> && kVectorBytes == 32) {
    return (vec_t<float>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<T, float> && kVectorBytes == 64) {
    return (vec_t<float>)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#endif
  } else {
    vec_t<T> v;
    for (int i = 0; i < Vec<T>::size; ++i) v[i] = static_cast<T>(src[i]);
    return v;
  }
}

// dst[0:n] = src[0:n] * scale, zero-filled up to dst[padded).
template <typename S, typename T>
inline void load_row(const S* src, int64_t n, T scale, T* dst, int64_t padded) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]) * scale;
  for (int64_t i = n; i < padded; ++i) dst[i] = T(0);
}

template <typename S, typename A, typename T>
inline void store_row(const A* src, int64_t n, T scale, S* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(static_cast<T>(src[i] * scale));
}

// Prefetch a whole row of D elements: one request per cache line (the hardware fetches one line per miss, and
// gathered or far-apart rows give its stream detector nothing to follow).
template <int Locality = 3, typename S>
inline void prefetch_row(const S* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * int64_t(sizeof(S)); off += 64) __builtin_prefetch(c + off, 0, Locality);
}

// Rows ahead of the one being packed that the pack loops prefetch. Packing reads rows a row stride apart (H D
// elements: 2 KB at H = 8, D = 64), which the hardware prefetchers follow late: without it K^T's and V's packs
// stalled on the first load of every row (perf: ~45% of the pack loop's samples on that one load).
inline constexpr int64_t kPrefetchRows = 8;

// Rows [r0, r1) of a (rows x D) matrix with row stride `stride` into row-major dst (rows x ld).
// Used for A operands (read in place by the GEMM).
template <typename S, typename T>
inline void pack_rows(const S* src, int64_t stride, int64_t r0, int64_t r1, int64_t D, T scale, T* dst,
                      int64_t ld) {
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kPrefetchRows < r1) prefetch_row(src + (r + kPrefetchRows) * stride, D);
    load_row(src + r * stride, D, scale, dst + r * ld, ld);
  }
}

// W source rows (`stride` apart) x W lanes from column `col`, transposed in registers into W panel rows (NR
// apart) at `out`: the block step of the transposed packs. Scaled: the lanes widened to T and times `scale`;
// else the source's bytes as they are (bf16 pairs as 32-bit words). Each load requests the same columns of the
// next block's row (`ahead` of those rows exist: W rows ahead, as far as the row-by-row loops prefetch), spread
// over the block where requesting whole rows at its start flooded the misses.
template <int NR, bool Scaled, typename T, typename S>
inline void transpose_block(const S* rows, int64_t stride, int64_t col, int64_t ahead, vec_t<T> scale, T* out,
                            int64_t ld = NR) {
  constexpr int W = Vec<T>::size;
  vec_t<T> t[W];
  for (int x = 0; x < W; ++x) {
    if (x < ahead) __builtin_prefetch(rows + (W + x) * stride + col, 0, 3);
    if constexpr (Scaled)
      t[x] = load_vec<T>(rows + x * stride + col) * scale;
    else
      t[x] = vload(reinterpret_cast<const T*>(rows + x * stride + col));  // memcpy: any bytes, no aliasing
  }
  transpose_square<T>(t);
  for (int x = 0; x < W; ++x) vstore(out + x * ld, t[x]);
}

// B = src^T (D x rows) in GEMM panel layout (cpu/gemm.h), strip = D * NR: element (d, r) at
// dst[(r / NR) * D * NR + d * NR + r % NR]. For K^T, V^T, (c Q)^T, dO^T. Rows [r0, r1) must start on
// a panel boundary; callers zero the buffer once so that padding columns read as 0.
template <int NR, typename S, typename T>
inline void pack_transposed_panels(const S* src, int64_t stride, int64_t r0, int64_t r1, int64_t D, T scale,
                                   T* dst) {
  constexpr int W = Vec<T>::size;
  for (int64_t p0 = r0; p0 < r1; p0 += NR) {
    T* panel = dst + (p0 / NR) * D * NR;
    const int64_t n = std::min<int64_t>(NR, r1 - p0);
    int64_t r = 0;
    if constexpr (NR % W == 0) {
      // W rows at a time, W x W blocks transposed in registers and stored as W vectors (a panel row holds
      // NR >= W columns): the scalar scatter below was ~11% of a 16-token call's operator time
      const vec_t<T> vs = vsplat(scale);
      for (; r + W <= n; r += W) {
        const S* rows = src + (p0 + r) * stride;
        const int64_t ahead = std::min<int64_t>(W, r1 - (p0 + r + W));
        int64_t d = 0;
        for (; d + W <= D; d += W)
          transpose_block<NR, true>(rows, stride, d, ahead, vs, panel + d * NR + r);
        for (; d < D; ++d)
          for (int x = 0; x < W; ++x) panel[d * NR + r + x] = static_cast<T>(rows[x * stride + d]) * scale;
      }
    }
    // the rest row by row: each source row is read once, contiguously. Column by column (the store order) read
    // NR rows a row stride apart per element, and with the strides attention has (H D elements: 2 KB at H = 8,
    // D = 64) those rows share two L1 sets and evicted each other on every column: K^T's pack was load-latency
    // bound, 3x the cost of V's (row-major) pack of the same bytes.
    for (; r < n; ++r) {
      const S* row = src + (p0 + r) * stride;
      if (p0 + r + kPrefetchRows < r1) prefetch_row(row + kPrefetchRows * stride, D);
      for (int64_t d = 0; d < D; ++d) panel[d * NR + r] = static_cast<T>(row[d]) * scale;
    }
  }
}

// Zeroes the last panel of `count` transposed-panel buffers of `rows` columns, whose padding columns
// pack_transposed_panels leaves unwritten, instead of zeroing whole buffers. Call it before the pack: the
// panel's valid columns are zeroed too (one fill of D x NR contiguous elements a buffer, where the
// padding alone was D short fills: 512 memset calls for 8 heads at D = 64, a visible part of a short call).
template <int NR, typename T>
inline void zero_padding_panels(T* dst, int64_t count, int64_t rows, int64_t D) {
  if (rows % NR == 0) return;
  const int64_t rows_pad = (rows + NR - 1) / NR * NR;
  for (int64_t i = 0; i < count; ++i) {
    T* panel = dst + i * rows_pad * D + (rows / NR) * D * NR;
    std::fill(panel, panel + D * NR, T(0));
  }
}

// B = src (rows x Dp) in GEMM panel layout, strip = rows * NR: element (r, d) at
// dst[(d / NR) * rows * NR + r * NR + d % NR], columns D..Dp zero. For V, K, dO, (scale Q) as the
// right-hand side of P V, dS K, P^T dO, dS^T Q. Source row r is row_at(r) (a paged cache's tile reads
// each row in its own page).
template <int NR, typename RowAt, typename T>
inline void pack_row_panels_at(RowAt&& row_at, int64_t r0, int64_t r1, int64_t D, int64_t Dp, int64_t rows, T scale,
                               T* dst) {
  const int64_t full = D / NR;  // strips without padding
  for (int64_t r = r0; r < r1; ++r) {
    const auto* row = row_at(r);
    if (r + kPrefetchRows < r1) prefetch_row(row_at(r + kPrefetchRows), D);
    for (int64_t s = 0; s < full; ++s) {
      T* out = dst + s * rows * NR + r * NR;
      for (int64_t i = 0; i < NR; i += Vec<T>::size) vstore(out + i, load_vec<T>(row + s * NR + i) * scale);
    }
    if (full * NR < Dp) {
      T* out = dst + full * rows * NR + r * NR;
      for (int64_t i = 0; i < NR; ++i) out[i] = full * NR + i < D ? static_cast<T>(row[full * NR + i]) * scale : T(0);
    }
  }
}

// The same from rows `stride` elements apart.
template <int NR, typename S, typename T>
inline void pack_row_panels(const S* src, int64_t stride, int64_t r0, int64_t r1, int64_t D, int64_t Dp,
                            int64_t rows, T scale, T* dst) {
  pack_row_panels_at<NR>([&](int64_t r) { return src + r * stride; }, r0, r1, D, Dp, rows, scale, dst);
}

}  // namespace attnops::cpu::ATTNOPS_ISA
