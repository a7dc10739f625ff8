// Attention dropout on the probabilities, regenerated (never stored): whether pair (query i, key j) of
// query head bh = b * H + h is kept is a hash of (seed, bh, i, j), the same function in the C++ kernels,
// the Triton kernels (core/triton_common.py `dropout_scale`) and the float64 reference
// (ops/softmax/reference.py `dropout_keep`), so every backend drops the same pairs and the backward
// recomputes the forward's mask from the seed alone:
//   head = fmix32(seed_lo ^ fmix32(seed_hi + bh * 0x9E3779B9))
//   row  = fmix32(head + i * 0x7FEB352D)
//   keep = (fmix32(row + j * 0x846CA68B) >> 8) >= threshold,  threshold = round(p * 2^24)
// (fmix32: MurmurHash3's finaliser; uint32 arithmetic throughout). Kept probabilities are scaled by
// 2^24 / (2^24 - threshold), the exact inverse of the keep rate, so the output is unbiased. A counter
// hash instead of Philox: three multiplies per pair vectorise on AVX2 and AVX-512 (vpmulld), and the
// mask needs no state beyond the seed.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace attnops::cpu::ATTNOPS_ISA {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

struct Dropout {
  static constexpr uint32_t kKeyMul = 0x846CA68Bu;
  uint32_t seed_lo = 0, seed_hi = 0;
  uint32_t threshold = 0;  // 0: off
  double scale = 1.0;

  Dropout() = default;
  Dropout(double p, const c10::optional<at::Tensor>& seed) {
    if (p <= 0.0) return;
    const int64_t s = seed->to(at::kCPU).item<int64_t>();
    seed_lo = static_cast<uint32_t>(static_cast<uint64_t>(s) & 0xFFFFFFFFu);
    seed_hi = static_cast<uint32_t>(static_cast<uint64_t>(s) >> 32);
    threshold = static_cast<uint32_t>(std::llround(p * 16777216.0));
    scale = 16777216.0 / (16777216.0 - threshold);
  }
  bool on() const { return threshold > 0; }
  uint32_t row_key(int64_t bh, int64_t i) const {
    const uint32_t head = fmix32(seed_lo ^ fmix32(seed_hi + static_cast<uint32_t>(bh) * 0x9E3779B9u));
    return fmix32(head + static_cast<uint32_t>(i) * 0x7FEB352Du);
  }

  // s[x] *= (kept ? scale : 0) for the keys col0 + x of one query row (x < n). A multiply by the selected
  // factor, not a select of the product: GCC vectorises this form (three vpmulld per 8 or 16 pairs) and not
  // the other ("control flow in loop"). A dropped NaN stays NaN, only in rows whose scores are NaN anyway.
  template <typename T>
  void apply_row(T* s, int64_t n, uint32_t row, int64_t col0) const {
    const T sc = static_cast<T>(scale);
    const uint32_t base = row + static_cast<uint32_t>(col0) * kKeyMul;
    for (int64_t x = 0; x < n; ++x) {
      const uint32_t h = fmix32(base + static_cast<uint32_t>(x) * kKeyMul);
      s[x] = s[x] * ((h >> 8) >= threshold ? sc : T(0));
    }
  }
  // z[x] = kept ? scale : 0 for one key against the queries whose row keys are rows[0, n).
  template <typename T>
  void column(T* z, int64_t n, const uint32_t* rows, int64_t key) const {
    const T sc = static_cast<T>(scale);
    const uint32_t k = static_cast<uint32_t>(key) * kKeyMul;
    for (int64_t x = 0; x < n; ++x) z[x] = (fmix32(rows[x] + k) >> 8) >= threshold ? sc : T(0);
  }
  // z[x] = kept ? scale : 0 for one query row against the keys col0 + x.
  template <typename T>
  void row(T* z, int64_t n, uint32_t row, int64_t col0) const {
    const T sc = static_cast<T>(scale);
    const uint32_t base = row + static_cast<uint32_t>(col0) * kKeyMul;
    for (int64_t x = 0; x < n; ++x)
      z[x] = (fmix32(base + static_cast<uint32_t>(x) * kKeyMul) >> 8) >= threshold ? sc : T(0);
  }
};

}  // namespace attnops::cpu::ATTNOPS_ISA
