// Row operations of the memory-bound kernels (decode, low-rank-key attention): a cache row
// widened to the compute type, and a dot product with the row left in its storage type.
#pragma once

#include <cstdint>
#include <type_traits>

#if ATTNOPS_X86_SIMD
#include <immintrin.h>
#endif

#include "cpu/pack.h"
#include "cpu/vec.h"

namespace attnops::cpu::ATTNOPS_ISA {

// A cache row in the compute type: the row itself when the cache already holds it (float caches:
// no copy), else widened into `buf` (padding lanes stay 0).
template <typename S, typename T>
inline const T* compute_row(const S* src, int64_t D, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    constexpr int W = Vec<T>::size;
    int64_t d = 0;
    for (; d + W <= D; d += W) vstore(buf + d, load_vec<T>(src + d));
    for (; d < D; ++d) buf[d] = static_cast<T>(src[d]);
    return buf;
  }
}

// q . k over D elements in q's compute type, k in the cache's type (both widened in registers where stored
// narrower); two accumulators halve the FMA dependency chain.
template <typename A, typename S, typename T = compute_t<A>>
inline T dot(const A* q, const S* k, int64_t D) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V a0{}, a1{};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    a0 += load_vec<T>(q + d) * load_vec<T>(k + d);
    a1 += load_vec<T>(q + d + W) * load_vec<T>(k + d + W);
  }
  for (; d + W <= D; d += W) a0 += load_vec<T>(q + d) * load_vec<T>(k + d);
  T r = hsum<T>(a0 + a1);
  for (; d < D; ++d) r += static_cast<T>(q[d]) * static_cast<T>(k[d]);
  return r;
}

// Lane x of the result = the horizontal sum of a[x], for Vec<T>::size vectors: W dot products
// finished at once (one hadd tree instead of W shuffle trees) and stored with one vector store.
template <typename T>
inline vec_t<T> transpose_sum(const vec_t<T>* a) {
  vec_t<T> r;
  for (int x = 0; x < Vec<T>::size; ++x) r[x] = hsum<T>(a[x]);
  return r;
}

#if ATTNOPS_VEC_BYTES == 64
// 16 float lanes (AVX-512): a tree of two-source shuffles, each level adding pairs of vectors whose lanes hold
// halves of the remaining partial sums, 30 shuffles and 15 adds where 16 separate reductions took 64 of each
// (the fallback above: Loki's gathered scores and MQA decode's dots spent more on it than on their FMAs).
template <>
inline vec_t<float> transpose_sum<float>(const vec_t<float>* a) {
  using V = vec_t<float>;
  using I = Vec<float>::itype;
  auto level = [](V* v, int n, I lo, I hi) {  // v[x] = lanes `lo` of (v[x], v[x + n]) + lanes `hi`
    for (int x = 0; x < n; ++x) v[x] = __builtin_shuffle(v[x], v[x + n], lo) + __builtin_shuffle(v[x], v[x + n], hi);
  };
  V v[16];
  for (int x = 0; x < 16; ++x) v[x] = a[x];
  level(v, 8, I{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        I{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  level(v, 4, I{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        I{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  level(v, 2, I{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        I{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  level(v, 1, I{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
        I{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  return v[0];  // lane x: block x of the last level, whose partial sums all came from a[x]
}
#endif

#if ATTNOPS_X86_SIMD && ATTNOPS_VEC_BYTES == 32
template <>
inline vec_t<float> transpose_sum<float>(const vec_t<float>* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[0], (__m256)a[1]),
                                   _mm256_hadd_ps((__m256)a[2], (__m256)a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[4], (__m256)a[5]),
                                   _mm256_hadd_ps((__m256)a[6], (__m256)a[7]));
  // t0 holds the sums of a[0..3] over each 128-bit half, t1 those of a[4..7]
  return (vec_t<float>)_mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
#endif

// Scores of R query rows (Dp apart, zero-padded) against NK keys in the cache's type, widened in
// registers: s[r * ld + j] = q_r . k_j. The R * NK accumulators are independent chains (one dot per
// row and key is a single dependent FMA chain, latency-bound: GQA decode reached 40% of the copy
// bandwidth that way), and each key vector is loaded once for all R rows.
template <int R, int NK, typename T, typename S>
inline void dots_block(const T* q, int64_t Dp, const S* const* k, int64_t D, T* s, int64_t ld) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V a[R * NK] = {};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V x[NK];
    for (int j = 0; j < NK; ++j) x[j] = load_vec<T>(k[j] + d);
    for (int r = 0; r < R; ++r) {
      V qv = vload(q + r * Dp + d);
      asm("" : "+x"(qv));  // one load per q vector: folded into each FMA, it was loaded once per key
      for (int j = 0; j < NK; ++j) a[r * NK + j] += qv * x[j];
    }
  }
  T sum[R * NK];
  if constexpr (R * NK == W) {
    vstore(sum, transpose_sum<T>(a));
  } else {
    for (int x = 0; x < R * NK; ++x) sum[x] = hsum<T>(a[x]);
  }
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NK; ++j) sum[r * NK + j] += q[r * Dp + d] * static_cast<T>(k[j][d]);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NK; ++j) s[r * ld + j] = sum[r * NK + j];
}

}  // namespace attnops::cpu::ATTNOPS_ISA
