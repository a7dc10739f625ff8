// Online softmax over score tiles, shared by the attention, decode and block-map kernels.
//
// A tile row holds scores in base 2 (softmax_scale * log2(e) folded into Q) for the columns
// [t0, t0 + n) of one query; only [v0, v1) of them are valid (predicates and masks), the rest is
// set to -inf here so that exp2 gives exact zeros.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/gemm.h"
#include "cpu/vec.h"

namespace attnops::cpu::ATTNOPS_ISA {

// The kernels run the softmax in base 2 (exp2 is the cheap one): scores are scaled by log2(e) and
// the lse converted back with ln(2).
inline constexpr double kLog2e = 1.4426950408889634;
inline constexpr double kLn2 = 0.6931471805599453;

// Valid columns of one tile row, relative to the tile start t0: [v0, v1).
struct RowSpan {
  int64_t v0, v1;
  bool empty() const { return v0 >= v1; }
};

// The largest score of a row, NaN-propagating, lane by lane (hmax of it: the row's).
template <typename T>
inline vec_t<T> row_max_lanes(const T* s, int64_t n) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V mx = vsplat<T>(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < n; j += W) mx = vmax_nan<T>(vload(s + j), mx);
  return mx;
}

// Masks a score row outside [v0, v1) to -inf over the tile's padded width n (a multiple of W) and
// returns the masked row's max lane by lane (mask_row_max: the row's). One pass of vector selects: the
// scalar stores it replaces (up to a tile's width per row on every causal diagonal and window edge, half
// of every row at S = 16) were followed by a reload of the row for its max that waited on them.
template <typename T>
inline vec_t<T> mask_row_max_lanes(T* s, RowSpan span, int64_t n) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  if (span.v0 <= 0 && span.v1 >= n) return row_max_lanes(s, n);
  const V ninf = vsplat(-std::numeric_limits<T>::infinity());
  // bounds clamped to [0, n]: exact in T, however far outside the tile the span's ends lie
  const V lo = vsplat(T(std::clamp<int64_t>(span.v0, 0, n))), hi = vsplat(T(std::clamp<int64_t>(span.v1, 0, n)));
  const V iota = lane_iota<T>();
  V mx = ninf;
  for (int64_t j = 0; j < n; j += W) {
    const V col = vsplat(T(j)) + iota;
    const V x = (col >= lo) & (col < hi) ? vload(s + j) : ninf;
    vstore(s + j, x);
    mx = vmax_nan<T>(x, mx);
  }
  return mx;
}

template <typename T>
inline T mask_row_max(T* s, RowSpan span, int64_t n) {
  return hmax<T>(mask_row_max_lanes(s, span, n));
}

template <typename T>
inline void mask_row(T* s, RowSpan span, int64_t n) {
  if (span.v0 > 0 || span.v1 < n) (void)mask_row_max(s, span, n);
}

template <typename T>
inline void zero_row(T* s, int64_t n) {
  std::fill(s, s + n, T(0));
}

// Zeroes a row of probabilities (or their gradients) outside [v0, v1): masked entries must be exact
// zeros even where exp2 made NaN of them (a NaN lse) or a NaN dP multiplied them, or the products
// below would carry the NaN to rows and keys that never attend each other.
template <typename T>
inline void zero_outside(T* s, RowSpan span, int64_t n) {
  std::fill(s, s + std::clamp<int64_t>(span.v0, 0, n), T(0));
  std::fill(s + std::clamp<int64_t>(span.v1, 0, n), s + n, T(0));
}

// C[r] (+)= A[r, v0:v1] B[v0:v1, :] row by row, each over its own span only (B in GEMM panels). The
// products of the rare calls whose operands hold NaN or Inf: one GEMM over the whole tile multiplies
// the masked zeros of A by B's rows too, and 0 * NaN = NaN would reach rows that never attend them.
template <typename T>
inline void gemm_in_spans(int64_t rows, const RowSpan* spans, int64_t N, const T* A, int64_t lda, const T* B,
                          int64_t strip, T* C, int64_t ldc, bool accumulate, const T* c_scale = nullptr) {
  constexpr int64_t NR = kGemmN<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const RowSpan span = spans[r];
    T* c = C + r * ldc;
    if (span.empty()) {  // what the GEMM does to a row of zeros
      if (!accumulate) std::fill(c, c + N, T(0));
      else if (c_scale && c_scale[r] != T(1)) for (int64_t j = 0; j < N; ++j) c[j] *= c_scale[r];
      continue;
    }
    gemm<T>(1, N, span.v1 - span.v0, A + r * lda + span.v0, lda, B + span.v0 * NR, strip, c, ldc, accumulate,
            c_scale ? c_scale + r : nullptr);
  }
}

// Rows [0, rows) of a tile (rows <= W): each row masked to its span (mask_row_max_lanes) and its max, lane i of the
// result (-inf for an empty span or i >= rows), the W rows' maxima in one shuffle tree (hreduce_rows).
template <typename T>
inline vec_t<T> rows_max(T* s, int64_t lds, int64_t rows, int64_t n, const RowSpan* spans) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V lanes[W];
  for (int64_t i = 0; i < W; ++i)
    lanes[i] = i < rows && !spans[i].empty() ? mask_row_max_lanes(s + i * lds, spans[i], n)
                                             : vsplat(-std::numeric_limits<T>::infinity());
  return hreduce_rows<T>(lanes, [](V a, V b) { return vmax_nan<T>(a, b); });
}

// P's exponential: exp2, or exp2_bf16p where P is rounded to bf16 before its product (Bf16P: the forward's bf16
// products) and a float32 accurate exponential buys nothing.
template <bool Bf16P, typename T>
inline vec_t<T> exp2_p(vec_t<T> x) {
  if constexpr (Bf16P && std::is_same_v<T, float>) return exp2_bf16p(x);
  else return exp2(x);
}

// step(std::true_type{}) where `bf16p` (P is rounded to bf16 for its products: exp2_p's cubic), else
// step(std::false_type{}); the bf16 form is instantiated only where `Dot` (the input type has bf16 products at this
// level), so that one call site serves both.
template <bool Dot, typename Step>
inline void with_p_exp(bool bf16p, Step&& step) {
  if constexpr (Dot)
    if (bf16p) return step(std::true_type{});
  step(std::false_type{});
}

// The exponential half of an online-softmax step, given the (masked) row's max m_tile: updates the running max m,
// turns s into P, returns in alpha the factor by which the row's output accumulator must be rescaled and in sum
// P's lanes (the row's sum is their hreduce). False where the row has attended nothing yet (only -inf scores so
// far): P is zeros, alpha 1, m and the sum unchanged. Bf16P: exp2_p's.
template <typename T, bool Bf16P = false>
inline bool exp_row(T* s, int64_t n, T m_tile, T& m, T& alpha, vec_t<T>& sum) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  alpha = T(1);
  sum = V{};
  const T m_new = m_tile != m_tile ? m_tile : std::max(m, m_tile);
  if (m_new == -std::numeric_limits<T>::infinity()) {
    zero_row(s, n);
    return false;
  }
  alpha = exp2_scalar(m - m_new);
  const V mv = vsplat(m_new);
  for (int64_t j = 0; j < n; j += W) {
    const V p = exp2_p<Bf16P, T>(vload(s + j) - mv);
    vstore(s + j, p);
    sum += p;
  }
  m = m_new;
  return true;
}

// exp_row and the running sum l of one row.
template <typename T, bool Bf16P = false>
inline void softmax_row_exp(T* s, int64_t n, T m_tile, T& m, T& l, T& alpha) {
  vec_t<T> sum;
  if (exp_row<T, Bf16P>(s, n, m_tile, m, alpha, sum)) l = l * alpha + hsum<T>(sum);
}

// One online-softmax step on a tile row: updates the running max m and sum l, turns s into P and
// returns in alpha the factor by which the row's output accumulator must be rescaled (the P V
// GEMM applies it as it loads the accumulator).
template <typename T>
inline void softmax_row(T* s, int64_t n, RowSpan span, T& m, T& l, T& alpha) {
  alpha = T(1);
  if (span.empty()) {
    zero_row(s, n);
    return;
  }
  softmax_row_exp(s, n, mask_row_max(s, span, n), m, l, alpha);
}

// softmax_row on the rows [0, rows) of a tile (s, lds elements a row), their max and sum reductions taken W rows at
// a time (hreduce_rows, one shuffle tree for W rows): on the 64-key tiles of block masks the rows' hmax and hsum
// were a large part of the step. Bit for bit softmax_row's m, l, alpha and P (softmax_row_exp's with Bf16P).
template <typename T, bool Bf16P = false>
inline void softmax_rows(T* s, int64_t lds, int64_t rows, int64_t n, const RowSpan* spans, T* m, T* l, T* alpha) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  for (int64_t g = 0; g < rows; g += W) {
    const int64_t nr = std::min<int64_t>(W, rows - g);
    const V m_tile = rows_max(s + g * lds, lds, nr, n, spans + g);
    V lanes[W];  // the rows' sums, lane by lane
    bool updated[W] = {};
    for (int64_t i = 0; i < nr; ++i) {  // softmax_row, the sum's reduction aside
      const int64_t r = g + i;
      if (spans[r].empty()) {
        alpha[r] = T(1);
        zero_row(s + r * lds, n);
        lanes[i] = V{};
        continue;
      }
      updated[i] = exp_row<T, Bf16P>(s + r * lds, n, m_tile[i], m[r], alpha[r], lanes[i]);
    }
    for (int64_t i = nr; i < W; ++i) lanes[i] = V{};
    const V sums = hreduce_rows<T>(lanes, [](V a, V b) { return a + b; });
    for (int64_t i = 0; i < nr; ++i)
      if (updated[i]) l[g + i] = l[g + i] * alpha[g + i] + sums[i];  // as softmax_row_exp's, contracted alike
  }
}

}  // namespace attnops::cpu::ATTNOPS_ISA
