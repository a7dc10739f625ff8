// Score modifiers between Q K^T and the softmax, in FlashAttention's order (conventions.md):
//   s = scale * q . k  ->  softcap: cap * tanh(s / cap)  ->  mask  ->  ALiBi: - slope * |i + Sk - Sq - j|
//   ->  softmax with the sinks as one more logit per row.
// The kernels' scores are in base 2 (scale * log2(e) folded into Q), so the cap, slopes and sinks are
// converted to base 2 here too: cap2 * tanh(s2 / cap2) with cap2 = cap * log2(e) is the base-2 image of
// the softcap, and a bias b becomes b * log2(e).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/softmax.h"
#include "cpu/vec.h"


namespace attnops::cpu::ATTNOPS_ISA {

// tanh for floats: Eigen's rational approximation (odd degree-13 numerator, even degree-6 denominator) on
// x clamped to +-7.9988, where tanh is 1 to float precision. Max error 2.6e-7 against libm's double tanh
// over [-20, 20] (measured), 13% cheaper than 1 - 2 / (exp(2x) + 1) with the vectorised exp2, which was
// a cycle per score: the softcap's whole cost. NaN stays NaN (the comparisons are false for it).
inline vec_t<float> vtanh(vec_t<float> x) {
  using V = vec_t<float>;
  const V c = vsplat(7.99881172180175781f);
  x = x > c ? c : x;
  x = x < -c ? -c : x;
  const V x2 = x * x;
  V p = vsplat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  V q = vsplat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

// |x| by clearing the sign bit (a compare and a blend otherwise).
template <typename T>
inline vec_t<T> vabs(vec_t<T> x) {
  using I = typename Vec<T>::itype;
  vec_t<T> sign;  // -0.0 in every lane (vsplat would give 0.0 + -0.0 = +0.0)
  for (int i = 0; i < Vec<T>::size; ++i) sign[i] = T(-0.0);
  return (vec_t<T>)((I)x & ~(I)sign);
}

inline vec_t<double> vtanh(vec_t<double> y) {
  for (int i = 0; i < Vec<double>::size; ++i) y[i] = std::tanh(y[i]);
  return y;
}

template <typename T>
struct ScoreMods {
  T cap2 = 0;               // softcap * log2(e); 0: off
  std::vector<T> slopes2;   // (Bm, H) ALiBi slopes * log2(e); empty: no ALiBi
  std::vector<T> sinks2;    // (H,) sink logits * log2(e); empty: no sinks
  int64_t slopes_batch = 0;  // H when slopes are per batch, 0 when shared
  int64_t H = 0;

  ScoreMods() = default;
  ScoreMods(double softcap, const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks,
            int64_t num_heads)
      : cap2(static_cast<T>(softcap * 1.4426950408889634)), H(num_heads) {
    if (alibi_slopes.has_value() && alibi_slopes->defined()) {
      slopes2 = base2(*alibi_slopes);
      slopes_batch = alibi_slopes->dim() == 2 ? H : 0;
    }
    if (sinks.has_value() && sinks->defined()) sinks2 = base2(*sinks);
  }

  static std::vector<T> base2(const at::Tensor& t) {
    const at::Tensor d = t.to(at::kDouble).contiguous().cpu();
    std::vector<T> r(d.numel());
    for (int64_t i = 0; i < d.numel(); ++i) r[i] = static_cast<T>(d.data_ptr<double>()[i] * 1.4426950408889634);
    return r;
  }

  bool softcap() const { return cap2 != T(0); }
  bool alibi() const { return !slopes2.empty(); }
  bool sinks() const { return !sinks2.empty(); }
  // Whether a score tile needs a pass besides the mask (the sinks act in the epilogue only).
  bool on_scores() const { return softcap() || alibi(); }
  T slope2(int64_t b, int64_t h) const { return alibi() ? slopes2[b * slopes_batch + h] : T(0); }
  T sink2(int64_t h) const { return sinks2[h]; }

  // Modifies one score row s[0, n) in place: softcap, then ALiBi's -slope2 * |pos - j| (pos: the
  // row's distance origin in tile columns; the mask comes after, so values outside the row's valid span
  // are garbage the caller masks). With `grad`, also writes the softcap's derivative 1 - tanh^2 there
  // (the backward's dS is multiplied by it).
  void apply(T* s, int64_t n, T slope2, T pos, T* grad = nullptr) const {
    using V = vec_t<T>;
    constexpr int W = Vec<T>::size;
    const V iota = lane_iota<T>();
    const V cap = vsplat(cap2), inv_cap = vsplat(cap2 == T(0) ? T(0) : T(1) / cap2), sl = vsplat(slope2);
    for (int64_t j = 0; j < n; j += W) {
      V x = vload(s + j);
      if (softcap()) {
        const V t = vtanh(x * inv_cap);
        x = cap * t;
        if (grad) vstore(grad + j, vsplat(T(1)) - t * t);
      }
      if (alibi()) x -= sl * vabs<T>(vsplat(pos - T(j)) - iota);
      vstore(s + j, x);
    }
  }
};

// An additive bias (attn_bias): (Bm, Hm, Sqm, Sk) in the compute type, size-1 dims broadcast (stride 0),
// keys contiguous; natural-log units (the kernels add bias * log2(e)). A bool mask (SDPA's attn_mask: True
// attends) is read as such, one byte per pair, and widened to 0 / -inf per tile row (values()): no float copy
// of the Sq x Sk plane is made.
template <typename T>
struct ScoreBias {
  static constexpr int64_t kMaxRun = 256;  // the longest run values() widens: a forward / dq key tile
  const T* data = nullptr;
  const uint8_t* mask = nullptr;
  int64_t sb = 0, sh = 0, sq = 0;
  at::Tensor storage;

  ScoreBias() = default;
  explicit ScoreBias(const c10::optional<at::Tensor>& bias) {
    if (!bias.has_value() || !bias->defined()) return;
    storage = bias->scalar_type() == at::kBool ? *bias : bias->to(c10::CppTypeToScalarType<T>::value);
    if (storage.stride(3) != 1) storage = storage.contiguous();
    if (storage.scalar_type() == at::kBool)
      mask = reinterpret_cast<const uint8_t*>(storage.template data_ptr<bool>());
    else
      data = storage.template data_ptr<T>();
    sb = storage.size(0) == 1 ? 0 : storage.stride(0);
    sh = storage.size(1) == 1 ? 0 : storage.stride(1);
    sq = storage.size(2) == 1 ? 0 : storage.stride(2);
  }
  bool present() const { return data != nullptr || mask != nullptr; }
  // The n <= kMaxRun values bias[b, h, i, j + x] (down = false) or bias[b, h, i + x, j] (down = true), as a
  // pointer and its element stride: the tensor's memory for a float bias; `scratch` filled with 0 / -inf
  // (stride 1) for a bool mask.
  std::pair<const T*, int64_t> values(int64_t b, int64_t h, int64_t i, int64_t j, bool down, int64_t n,
                                      T* scratch) const {
    const int64_t at = b * sb + h * sh + i * sq + j, step = down ? sq : 1;
    if (data) return {data + at, step};
    const uint8_t* m = mask + at;
    const T ninf = -std::numeric_limits<T>::infinity();
    if (step == 1) {
      for (int64_t x = 0; x < n; ++x) scratch[x] = m[x] ? T(0) : ninf;
    } else {
      for (int64_t x = 0; x < n; ++x) scratch[x] = m[x * step] ? T(0) : ninf;
    }
    return {scratch, 1};
  }
};

// s[x] += log2(e) * bias[x * stride] for the first `valid` entries (the rest of a padded tile row is
// masked by the caller; reading it would leave the tensor).
template <typename T>
inline void add_bias(T* s, const T* bias, int64_t stride, int64_t valid) {
  const T c = static_cast<T>(1.4426950408889634);
  if (stride == 1) {
    for (int64_t x = 0; x < valid; ++x) s[x] += c * bias[x];
  } else {
    for (int64_t x = 0; x < valid; ++x) s[x] += c * bias[x * stride];
  }
}

// One forward score row in a single pass: the modifiers, the mask (-inf outside the row's valid span
// [v0, v1)) and the row's max, which softmax_row_exp takes (the unmodified path masks with mask_row and
// a max pass of its own: two passes where this is one). `bias`: the row's attn_bias from the tile's first
// key (its first `valid` entries exist), or null. `scale`: multiplies the scores first (the bf16 products leave them
// unscaled: a scaling pass over the tile spared).
template <typename T>
inline T modify_mask_max(const ScoreMods<T>& mods, T* s, int64_t n, RowSpan span, T slope2, T pos,
                         const T* bias = nullptr, int64_t valid = 0, T scale = T(1)) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const V iota = lane_iota<T>();
  const V cap = vsplat(mods.cap2), inv_cap = vsplat(mods.softcap() ? T(1) / mods.cap2 : T(0)), sl = vsplat(slope2);
  const V ninf = vsplat(-std::numeric_limits<T>::infinity());
  const V lo = vsplat(T(span.v0)), hi = vsplat(T(span.v1));
  V mx = ninf;
  const bool whole = span.v0 <= 0 && span.v1 >= n;  // interior tiles: nothing to mask
  const V sc = vsplat(scale);
  const bool scaled = scale != T(1);
  for (int64_t j = 0; j < n; j += W) {
    V x = vload(s + j);
    if (scaled) x = x * sc;
    if (mods.softcap()) x = cap * vtanh(x * inv_cap);
    const V col = vsplat(T(j)) + iota;
    if (mods.alibi()) x -= sl * vabs<T>(vsplat(pos) - col);
    if (bias) {  // after the softcap, like ALiBi; the row's last entries may end before the vector
      V bv{};
      if (j + W <= valid) {
        bv = vload(bias + j);
      } else {
        for (int lane = 0; lane < W && j + lane < valid; ++lane) bv[lane] = bias[j + lane];
      }
      x += bv * static_cast<T>(1.4426950408889634);
    }
    if (!whole) x = (col >= lo) & (col < hi) ? x : ninf;
    vstore(s + j, x);
    mx = vmax_nan<T>(x, mx);
  }
  return hmax<T>(mx);
}

// Folds the sinks into a finished row (running max m, sum l, base 2): the sink joins the denominator,
// m and l become the sink-inclusive ones, and the returned factor rescales the row's accumulator. A
// row that saw no key (l = 0) ends with l = 1 relative to m = sink: lse = the sink, output 0.
template <typename T>
inline T fold_sink(T sink2, T& m, T& l) {
  if (l == T(0)) {
    m = sink2;
    l = T(1);
    return T(0);
  }
  const T m_new = sink2 != sink2 ? sink2 : std::max(m, sink2);
  const T alpha = exp2_scalar(m - m_new);
  l = l * alpha + exp2_scalar(sink2 - m_new);
  m = m_new;
  return alpha;
}

}  // namespace attnops::cpu::ATTNOPS_ISA
