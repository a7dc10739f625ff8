// Portable SIMD vectors (GCC/Clang vector extensions) and a vectorised exp2.
//
// Why not at::vec: its width is fixed per translation unit by CPU_CAPABILITY macros, and mixing
// capabilities inside one .so risks ODR clashes of inline torch functions. These headers are
// compiled once per ISA level instead (cpu/isa.h): the level's translation unit sets
// ATTNOPS_VEC_BYTES (16 generic, 32 AVX2, 64 AVX-512) and the target pragma, and everything here
// lives in that level's namespace attnops::cpu::<level>. The compiler's own __AVX2__-style macros
// cannot be used: in C++ they do not follow #pragma GCC target.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace attnops::cpu::ATTNOPS_ISA {

#if !defined(ATTNOPS_ISA) || !defined(ATTNOPS_VEC_BYTES)
#error "cpu/*.h are compiled per ISA level: include them from a csrc/cpu/isa_*.cpp unit (see cpu/isa.h)"
#endif

inline constexpr int kVectorBytes = ATTNOPS_VEC_BYTES;

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t itype __attribute__((vector_size(kVectorBytes)));
  static constexpr int size = kVectorBytes / sizeof(float);
};

template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef int64_t itype __attribute__((vector_size(kVectorBytes)));
  static constexpr int size = kVectorBytes / sizeof(double);
};

template <typename T>
using vec_t = typename Vec<T>::type;

// memcpy compiles to one unaligned vector load/store.
template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline vec_t<T> vsplat(T x) {
  return vec_t<T>{} + x;
}

// The lane numbers 0, 1, ..., W - 1 (column offsets within a vector).
template <typename T>
inline vec_t<T> lane_iota() {
  vec_t<T> v;
  for (int i = 0; i < Vec<T>::size; ++i) v[i] = T(i);
  return v;
}

// Lane numbers as a parameter pack, for shuffle masks built at compile time (the ISA units keep to their own
// templates: DESIGN.md, CPU ISA levels).
template <int... J>
struct LaneIndex {};
template <int N, int... J>
struct MakeLaneIndex : MakeLaneIndex<N - 1, N - 1, J...> {};
template <int... J>
struct MakeLaneIndex<0, J...> {
  using type = LaneIndex<J...>;
};

// The two-source masks of a transpose stage that swaps the off-diagonal B x B blocks of each 2B x 2B block:
// lane j of the first output keeps x[j] in even B-blocks and takes y[j - B] in odd ones; the second takes
// x[j + B] in even ones and keeps y[j] in odd ones (indices >= W select from y).
template <typename T, int B, bool Second, int... J>
constexpr typename Vec<T>::itype swap_blocks_mask(LaneIndex<J...>) {
  constexpr int W = Vec<T>::size;
  return typename Vec<T>::itype{((J / B) % 2 == 0 ? (Second ? J + B : J) : (Second ? W + J : W + J - B))...};
}

template <typename T, int B>
inline void transpose_stage(vec_t<T>* x) {
  constexpr int W = Vec<T>::size;
  if constexpr (B < W) {
    using Lanes = typename MakeLaneIndex<W>::type;
    constexpr auto first = swap_blocks_mask<T, B, false>(Lanes{});
    constexpr auto second = swap_blocks_mask<T, B, true>(Lanes{});
    for (int i = 0; i < W; ++i)
      if ((i / B) % 2 == 0) {
        const vec_t<T> a = x[i], b = x[i + B];
        x[i] = __builtin_shuffle(a, b, first);
        x[i + B] = __builtin_shuffle(a, b, second);
      }
    transpose_stage<T, 2 * B>(x);
  }
}

// x[i][j] <- x[j][i] for the W x W matrix of W vectors: log2(W) stages of W two-source shuffles (64 at
// W = 16), where scattering it took W * W scalar stores.
template <typename T>
inline void transpose_square(vec_t<T>* x) {
  transpose_stage<T, 1>(x);
}

// NaN-propagating maximum: a NaN score must reach the softmax (NaN in, NaN out) instead of being
// skipped by a comparison, which would turn a NaN row into an "empty" row of zeros.
template <typename T>
inline vec_t<T> vmax_nan(vec_t<T> a, vec_t<T> b) {
  return (a > b) | (a != a) ? a : b;
}

// A horizontal reduction by a shuffle tree: log2(W) shuffle + combine pairs instead of W - 1
// dependent scalar steps (the softmax does one max and one sum per tile row; on the 64-key tiles
// of a dilated mask or a short call the scalar chain was a visible part of the row's cost).
template <typename T, typename Combine>
inline T hreduce(vec_t<T> v, Combine combine) {
  using I = typename Vec<T>::itype;
  if constexpr (Vec<T>::size == 16) {
    v = combine(v, __builtin_shuffle(v, I{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
    v = combine(v, __builtin_shuffle(v, I{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
    v = combine(v, __builtin_shuffle(v, I{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
    v = combine(v, __builtin_shuffle(v, I{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
    return v[0];
  } else if constexpr (Vec<T>::size == 8) {
    v = combine(v, __builtin_shuffle(v, I{4, 5, 6, 7, 0, 1, 2, 3}));
    v = combine(v, __builtin_shuffle(v, I{2, 3, 0, 1, 6, 7, 4, 5}));
    v = combine(v, __builtin_shuffle(v, I{1, 0, 3, 2, 5, 4, 7, 6}));
    return v[0];
  } else if constexpr (Vec<T>::size == 4) {
    v = combine(v, __builtin_shuffle(v, I{2, 3, 0, 1}));
    v = combine(v, __builtin_shuffle(v, I{1, 0, 3, 2}));
    return v[0];
  } else {
    static_assert(Vec<T>::size == 2, "vector widths are 2 to 16 lanes");
    v = combine(v, __builtin_shuffle(v, I{1, 0}));
    return v[0];
  }
}

// hreduce_rows' two-source masks at stage B: each of the two sources holds W / (2B) rows of 2B lanes; the output
// holds the first source's rows then the second's, B lanes each, lane j taking lane j % B (+ B: `Upper`) of its
// row (indices >= W select from the second source).
template <typename T, int B, bool Upper, int... J>
constexpr typename Vec<T>::itype reduce_rows_mask(LaneIndex<J...>) {
  constexpr int W = Vec<T>::size, per = W / (2 * B);
  return typename Vec<T>::itype{((J / B < per ? 0 : W) + (J / B) % per * 2 * B + J % B + (Upper ? B : 0))...};
}

// Lane i of the result = hreduce(x[i], combine) for the W vectors x[0, W) (x is overwritten): one tree for W rows,
// W - 1 combines of two-source shuffles where W hreduce trees take W log2(W) combines, their shuffles and a scalar
// each. Each stage pairs the lanes hreduce pairs (i and i + B, for B = W / 2, ..., 1) in hreduce's operand order,
// so every lane is bit for bit its row's hreduce (a max's NaN and signed zeros included).
template <typename T, int B = Vec<T>::size / 2, typename Combine>
inline vec_t<T> hreduce_rows(vec_t<T>* x, Combine combine) {
  using Lanes = typename MakeLaneIndex<Vec<T>::size>::type;
  constexpr auto lo = reduce_rows_mask<T, B, false>(Lanes{}), hi = reduce_rows_mask<T, B, true>(Lanes{});
  for (int k = 0; k < B; ++k)  // the stage's 2B vectors -> B (W rows, B lanes left each)
    x[k] = combine(__builtin_shuffle(x[2 * k], x[2 * k + 1], lo), __builtin_shuffle(x[2 * k], x[2 * k + 1], hi));
  if constexpr (B > 1) return hreduce_rows<T, B / 2>(x, combine);
  else return x[0];
}

// The largest lane, NaN if any lane is NaN (vmax_nan's rule).
template <typename T>
inline T hmax(vec_t<T> v) {
  return hreduce<T>(v, [](vec_t<T> a, vec_t<T> b) { return vmax_nan<T>(a, b); });
}

template <typename T>
inline T hsum(vec_t<T> v) {
  return hreduce<T>(v, [](vec_t<T> a, vec_t<T> b) { return a + b; });
}

// No NaN or Inf among p[0, n): x - x is 0 for finite x and NaN otherwise. A check on a task's outputs
// (rows x D) that picks the rare exact path for non-finite inputs, at the cost of one pass in L1.
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V acc{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V x = vload(p + i);
    acc += x - x;
  }
  T r = hsum<T>(acc);
  for (; i < n; ++i) r += p[i] - p[i];
  return r == r;
}

// 2^x for a vector of floats, x <= 127 (softmax feeds s - max <= 0). Range reduction x = n + f with n = round(x),
// |f| <= 1/2, `poly` for 2^f and n added to the exponent bits. x below `lowest` (masked -inf entries included) gives
// exactly 0, NaN stays NaN. No clamping first: lanes below it compute garbage that the final select discards, which
// saves two compare/blend pairs per vector. Every result kept must be normal: p(f) 2^n with n >= lowest.
template <typename Poly>  // always inlined: the softmax's inner loops call it once a vector
__attribute__((always_inline)) inline vec_t<float> exp2_with(vec_t<float> x, float lowest, Poly poly) {
  using V = vec_t<float>;
  // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
  const V magic = vsplat(12582912.0f);
  const V t = x + magic;
  const V p = poly(x - (t - magic));
#if ATTNOPS_X86_SIMD && ATTNOPS_VEC_BYTES == 64
  // AVX-512: VSCALEFPS multiplies by 2^n in one instruction, and the zeroing mask keeps NaN (unordered, so not
  // below `lowest`) and zeroes the rest below it: 5 vector instructions fewer than the exponent-bit sum and its two
  // selects (the softmax's exp is most of a bf16 step at AMX speed). The same values bit for bit, both exact on
  // normal results.
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(lowest), _CMP_NLT_UQ);
  return (V)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)(t - magic));
#else
  using I = Vec<float>::itype;
  const I n = (I)t - (I)magic;
  const V r = (V)((I)p + (n << 23));
  return x >= vsplat(lowest) ? r : (x == x ? vsplat(0.0f) : x);
#endif
}

// A degree-6 polynomial for 2^f (Cephes exp2f coefficients; measured max relative error 7.9e-8, no bias). Results
// kept from -126 on are normal: n >= -126 with p >= 1, or n >= -125 with p >= 2^-1/2.
inline vec_t<float> exp2(vec_t<float> x) {
  return exp2_with(x, -126.0f, [](vec_t<float> f) {
    vec_t<float> p = vsplat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    return p * f + 1.0f;
  });
}

// 2^x for softmax probabilities that are rounded to bf16 (8 significant bits: relative rounding up to 2^-9) before
// their product: a cubic for 2^f with p(0) = 1 (a row's largest score gives exactly 1, as with exp2), its other
// coefficients minimax in relative error over [-1/2, 1/2]: max 1.0e-4 measured in float32 (mean 4.4e-5 over x
// uniform in [-125, 0]), 20x below that rounding. Three multiply-adds fewer than exp2's degree 6 (FlashAttention-4
// emulates exp2 with a cubic for the same reason). Below -125: 0 (2^-125 at most), so every result kept is normal.
inline vec_t<float> exp2_bf16p(vec_t<float> x) {
  return exp2_with(x, -125.0f, [](vec_t<float> f) {
    vec_t<float> p = vsplat(5.500893088e-2f);
    p = p * f + 2.422109693e-1f;
    p = p * f + 6.932829283e-1f;
    return p * f + 1.0f;
  });
}

// The float64 path is the exact one (gradcheck, reference-grade CPU runs): libm per lane.
inline vec_t<double> exp2(vec_t<double> x) {
  for (int i = 0; i < Vec<double>::size; ++i) x[i] = std::exp2(x[i]);
  return x;
}

inline float exp2_scalar(float x) {
  vec_t<float> v = exp2(vsplat(x));
  return v[0];
}

inline double exp2_scalar(double x) { return std::exp2(x); }

}  // namespace attnops::cpu::ATTNOPS_ISA
