// What a CPU kernel needs to know about a mask: token-level predicates (causal, window, sequence
// lengths) and, optionally, a compressed-row block LUT (attnops.BlockMask).
//
// Every predicate we support keeps, for a query row, one contiguous key interval (and for a
// key, one contiguous query interval), so kernels mask a tile row by filling outside that
// interval instead of evaluating a predicate per element; tiles strictly inside need nothing.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace attnops::cpu::ATTNOPS_ISA {

struct Predicates {
  int64_t Sq = 0, Sk = 0;
  int64_t offset = 0;  // Sk - Sq: causal and windows align the bottom-right corner
  int64_t left = -1, right = -1;  // window; -1 is unbounded. causal is right = 0.
  // Token-exact segment bounds (packed documents, varlen batches), intersected with the above:
  // key_bounds (Bb, Sq, 2) holds each query's keys [lo, hi), query_bounds (Bb, Sk, 2) each key's
  // queries [lo, hi); Bb in {1, B}. Both columns are nondecreasing along the rows (the op builds them
  // so, the operator checks it), so a tile's range is [lo of its first row, hi of its last).
  const int32_t* kb = nullptr;
  const int32_t* qb = nullptr;
  int64_t kb_sb = 0, qb_sb = 0;

  Predicates(int64_t sq, int64_t sk, bool causal, int64_t window_left, int64_t window_right)
      // A window wider than the sequences is unbounded in effect; clamping keeps i + offset - left
      // and friends far from int64 overflow whatever the caller passed.
      : Sq(sq), Sk(sk), offset(sk - sq), left(window_left < 0 ? -1 : std::min(window_left, sk)),
        right(window_right < 0 ? -1 : std::min(window_right, sq)) {
    if (causal) right = 0;
  }
  void set_bounds(const c10::optional<at::Tensor>& key_bounds, const c10::optional<at::Tensor>& query_bounds) {
    if (key_bounds.has_value() && key_bounds->defined()) {
      kb = key_bounds->data_ptr<int32_t>();
      kb_sb = key_bounds->size(0) == 1 ? 0 : key_bounds->stride(0);
    }
    if (query_bounds.has_value() && query_bounds->defined()) {
      qb = query_bounds->data_ptr<int32_t>();
      qb_sb = query_bounds->size(0) == 1 ? 0 : query_bounds->stride(0);
    }
  }
  // Keys [key_lo(b, i), key_hi(b, i)) are visible to query i of batch b.
  int64_t key_lo(int64_t b, int64_t i) const {
    const int64_t lo = left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, Sk);
    return kb ? std::max<int64_t>(lo, kb[b * kb_sb + 2 * i]) : lo;
  }
  int64_t key_hi(int64_t b, int64_t i) const {
    const int64_t hi = right < 0 ? Sk : std::clamp<int64_t>(i + offset + right + 1, 0, Sk);
    return kb ? std::min<int64_t>(hi, kb[b * kb_sb + 2 * i + 1]) : hi;
  }
  // Queries [query_lo(b, j), query_hi(b, j)) see key j of batch b.
  int64_t query_lo(int64_t b, int64_t j) const {
    const int64_t lo = right < 0 ? 0 : std::clamp<int64_t>(j - right - offset, 0, Sq);
    return qb ? std::max<int64_t>(lo, qb[b * qb_sb + 2 * j]) : lo;
  }
  int64_t query_hi(int64_t b, int64_t j) const {
    const int64_t hi = left < 0 ? Sq : std::clamp<int64_t>(j + left - offset + 1, 0, Sq);
    return qb ? std::min<int64_t>(hi, qb[b * qb_sb + 2 * j + 1]) : hi;
  }
};

// One orientation of a block mask: for every (b, h, row block), the sorted column blocks it keeps.
// Forward/dq use the kv LUT (rows = query blocks, columns = key blocks); dk/dv use its transpose.
// B and H of the LUT may be 1 (broadcast).
struct BlockLut {
  const int32_t* counts = nullptr;   // (B, H, rows)
  const int32_t* indices = nullptr;  // (B, H, rows, width)
  int64_t B = 1, H = 1, rows = 0, width = 0;
  int64_t row_block = 0, col_block = 0;  // block sizes in tokens along rows / columns

  BlockLut() = default;
  BlockLut(const c10::optional<at::Tensor>& counts_t, const c10::optional<at::Tensor>& indices_t,
           int64_t row_block_size, int64_t col_block_size) {
    if (!counts_t.has_value() || !counts_t->defined()) return;
    TORCH_CHECK(indices_t.has_value() && indices_t->defined(), "block LUT: counts without indices");
    TORCH_CHECK(counts_t->scalar_type() == at::kInt && indices_t->scalar_type() == at::kInt,
                "block LUT tensors must be int32");
    TORCH_CHECK(counts_t->is_contiguous() && indices_t->is_contiguous(), "block LUT tensors must be contiguous");
    TORCH_CHECK(counts_t->dim() == 3 && indices_t->dim() == 4, "block LUT: counts (B,H,N), indices (B,H,N,W)");
    counts = counts_t->data_ptr<int32_t>();
    indices = indices_t->data_ptr<int32_t>();
    B = counts_t->size(0);
    H = counts_t->size(1);
    rows = counts_t->size(2);
    width = indices_t->size(3);
    row_block = row_block_size;
    col_block = col_block_size;
  }
  bool present() const { return counts != nullptr; }
  int64_t base(int64_t b, int64_t h, int64_t row) const {
    return ((B == 1 ? 0 : b) * H + (H == 1 ? 0 : h)) * rows + row;
  }
  int64_t count(int64_t b, int64_t h, int64_t row) const { return counts[base(b, h, row)]; }
};

// Calls f(a, e) for every maximal run [a, e) of consecutive kept column blocks of one LUT row,
// clipped to [lo, hi) and to `limit` (the sequence length). Without a LUT: f(lo, hi).
template <typename F>
inline void for_each_segment(const BlockLut& lut, int64_t b, int64_t h, int64_t row, int64_t lo, int64_t hi,
                             int64_t limit, F f) {
  hi = std::min(hi, limit);
  if (lo >= hi) return;
  if (!lut.present()) {
    f(lo, hi);
    return;
  }
  const int64_t base = lut.base(b, h, row);
  const int64_t n = lut.counts[base];
  const int32_t* idx = lut.indices + base * lut.width;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && idx[j] == idx[j - 1] + 1) ++j;
    const int64_t a = std::max<int64_t>(lo, int64_t(idx[i]) * lut.col_block);
    const int64_t e = std::min<int64_t>(hi, int64_t(idx[j - 1] + 1) * lut.col_block);
    if (a < e) f(a, e);
    i = j;
  }
}

}  // namespace attnops::cpu::ATTNOPS_ISA
