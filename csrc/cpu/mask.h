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
#include <numeric>
#include <vector>

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
  // ALiBi's distance origin per row, for layouts whose sequences differ in Lk - Lq (varlen): query i sits at key
  // i + alibi_q[i] rather than i + offset. A key's, alibi_k[j], is that of the first query that sees it: the bounds
  // keep every allowed pair inside one sequence, whose rows share one offset (what a key no query sees gets does not
  // matter). Set after set_bounds; shared by the batch rows (the bounds then are too).
  const int32_t* alibi_q = nullptr;
  std::vector<int64_t> alibi_k;
  void set_alibi_offsets(const c10::optional<at::Tensor>& offsets) {
    if (!offsets.has_value() || !offsets->defined()) return;
    alibi_q = offsets->data_ptr<int32_t>();
    if (qb == nullptr) return;  // a forward: rows are queries only
    alibi_k.resize(Sk);
    for (int64_t j = 0; j < Sk; ++j) alibi_k[j] = qb[2 * j] < qb[2 * j + 1] ? alibi_q[qb[2 * j]] : offset;
  }
  int64_t alibi_offset_q(int64_t i) const { return alibi_q ? alibi_q[i] : offset; }
  int64_t alibi_offset_k(int64_t j) const { return alibi_k.empty() ? offset : alibi_k[j]; }
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

// The key blocks regrouped by their residue mod `stride`, for a block mask every row of which keeps blocks of one
// residue class only (a dilated mask, LongNet's: blocks i, i - d, i - 2d, ...): the forward packs K and V class by
// class (class 0's blocks in order, then class 1's, ...), so that a row's blocks, `stride` apart in the sequence,
// are one run of consecutive blocks in the packed order and its key tiles are as wide as a sliding window's,
// instead of one block each. Positions in that order are "packed"; `start[c]` is class c's first packed block.
// Only for whole blocks (Sk a multiple of the block), so each class is a run of whole blocks.
struct KeyClasses {
  int64_t stride = 1, block = 0, blocks = 0;
  std::vector<int64_t> start;  // stride + 1 entries, start[stride] = blocks

  KeyClasses() = default;
  KeyClasses(int64_t stride_, int64_t block_, int64_t blocks_) : stride(stride_), block(block_), blocks(blocks_) {
    for (int64_t c = 0; c <= stride; ++c) start.push_back(c == 0 ? 0 : start.back() + members(c - 1, blocks));
  }
  bool on() const { return stride > 1; }
  // class c's blocks below block index j
  int64_t members(int64_t c, int64_t j) const { return j > c ? (j - c + stride - 1) / stride : 0; }
  int64_t packed_block(int64_t j) const { return start[j % stride] + j / stride; }
  // the key block at packed block x
  int64_t key_block(int64_t x) const {
    const int64_t c = std::upper_bound(start.begin(), start.end(), x) - start.begin() - 1;
    return c + (x - start[c]) * stride;
  }
  // A key bound x (keys [.., x) or [x, ..)) of a row whose blocks are in class c, as a packed position: class c's
  // keys before x are exactly those before the result (the map is monotone within a class).
  int64_t packed_bound(int64_t x, int64_t c) const {
    const int64_t j = x / block;
    const int64_t inside = j < blocks && j % stride == c ? x % block : 0;
    return (start[c] + members(c, j)) * block + inside;
  }
};

// Calls f(a, e) for every maximal run [a, e) of consecutive kept column blocks of one LUT row,
// clipped to [lo, hi) and to `limit` (the sequence length). Without a LUT: f(lo, hi).
// With key classes (on()), runs and bounds are in packed positions: blocks `stride` apart are consecutive there.
template <typename F>
inline void for_each_segment(const BlockLut& lut, int64_t b, int64_t h, int64_t row, int64_t lo, int64_t hi,
                             int64_t limit, F f, const KeyClasses* classes = nullptr) {
  hi = std::min(hi, limit);
  if (lo >= hi) return;
  if (!lut.present()) {
    f(lo, hi);
    return;
  }
  const int64_t base = lut.base(b, h, row);
  const int64_t n = lut.counts[base];
  const int32_t* idx = lut.indices + base * lut.width;
  const int64_t step = classes ? classes->stride : 1;
  auto at = [&](int64_t j) { return classes ? classes->packed_block(j) : j; };
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && idx[j] == idx[j - 1] + step) ++j;
    const int64_t a = std::max<int64_t>(lo, at(idx[i]) * lut.col_block);
    const int64_t e = std::min<int64_t>(hi, (at(idx[j - 1]) + 1) * lut.col_block);
    if (a < e) f(a, e);
    i = j;
  }
}

// Key classes for a block LUT whose every row keeps blocks of one residue mod some stride > 1 (the gcd of the
// differences between a row's consecutive blocks, over every row), of `block`-key blocks tiling Sk keys; off
// (stride 1) where no such stride exists, the blocks do not tile Sk, or `block` is not a multiple of `panel` (the
// packs' unit: a class run must start on a panel boundary).
inline KeyClasses key_classes(const BlockLut& lut, int64_t Sk, int64_t panel) {
  if (!lut.present() || lut.col_block <= 0 || Sk % lut.col_block || lut.col_block % panel) return {};
  int64_t g = 0;
  for (int64_t base = 0; base < lut.B * lut.H * lut.rows && g != 1; ++base) {
    const int32_t* idx = lut.indices + base * lut.width;
    for (int64_t i = 1; i < lut.counts[base]; ++i) g = std::gcd(g, int64_t(idx[i]) - idx[i - 1]);
  }
  const int64_t blocks = Sk / lut.col_block;
  if (g <= 1 || g >= blocks) return {};
  return KeyClasses(g, lut.col_block, blocks);
}

}  // namespace attnops::cpu::ATTNOPS_ISA
