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

// q . k over D elements, k in the cache's type (widened in registers); two accumulators halve the
// FMA dependency chain.
template <typename T, typename S>
inline T dot(const T* q, const S* k, int64_t D) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V a0{}, a1{};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    a0 += vload(q + d) * load_vec<T>(k + d);
    a1 += vload(q + d + W) * load_vec<T>(k + d + W);
  }
  for (; d + W <= D; d += W) a0 += vload(q + d) * load_vec<T>(k + d);
  T r = hsum<T>(a0 + a1);
  for (; d < D; ++d) r += q[d] * static_cast<T>(k[d]);
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

}  // namespace attnops::cpu::ATTNOPS_ISA
