// Argument checks of the registered operators, shared by their CPU and CUDA implementations.
//
// The Python ops validate user input once with friendly messages (attnops/ops/_checks.py), but users
// and torch.compile call torch.ops.attnops.* directly, so every operator checks what it is about to
// trust before touching memory: shapes, dtypes, divisibility, block sizes, and the values of block
// LUTs and sequence lengths that become indices. A bad call is a RuntimeError, never a signal or an
// out-of-bounds read. Value checks read CPU tensors only (on a GPU they would synchronise the stream;
// the GPU paths clamp instead).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace attnops {

constexpr int64_t kMaxHeadDim = 512;

inline bool is_attention_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// q (B, Sq, H, D), k and v (B, Sk, Hkv, D) of one floating dtype on one device, H % Hkv == 0,
// 1 <= D <= kMaxHeadDim.
// same_batch false: k, v are pages of a paged cache (their first dim counts pages, not sequences)
inline void check_qkv_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           bool same_batch = true) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-d (B, S, H, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(!same_batch || q.size(0) == k.size(0), op, ": batch sizes differ: q ", q.size(0), ", k/v ", k.size(0));
  TORCH_CHECK(q.size(3) == k.size(3), op, ": head dims differ: q ", q.size(3), ", k/v ", k.size(3));
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, op, ": num_heads (", q.size(2),
              ") must be a multiple of num_kv_heads (", k.size(2), ") >= 1");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head dim ", q.size(3), " is not in [1, ",
              kMaxHeadDim, "]");
  TORCH_CHECK(is_attention_dtype(q.scalar_type()), op, ": dtype ", q.scalar_type(),
              " is not float16, bfloat16, float32 or float64");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && k.device() == v.device(), op, ": q, k, v must be on one device");
}

inline void check_window_args(const char* op, int64_t left, int64_t right) {
  TORCH_CHECK(left >= -1 && right >= -1, op, ": window entries must be >= -1 (-1: unbounded), got (", left, ", ",
              right, ")");
}

inline void check_scale_arg(const char* op, double softmax_scale) {
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ", softmax_scale);
}

// A compressed-row block LUT (attnops.BlockMask): counts (Bm, Hm, rows) and indices (Bm, Hm, rows, W),
// int32, contiguous, Bm in {1, B}, Hm in {1, H}, rows = ceil(row_len / row_block); each row's count in
// [0, min(W, cols)] and its first `count` indices strictly ascending in [0, cols), cols =
// ceil(col_len / col_block). Absent (None) is fine: no LUT. `check_values` reads the LUT (CPU only).
inline void check_lut_args(const char* op, const char* what, const c10::optional<at::Tensor>& counts_opt,
                           const c10::optional<at::Tensor>& indices_opt, int64_t B, int64_t H, int64_t row_len,
                           int64_t col_len, int64_t row_block, int64_t col_block, bool check_values) {
  const bool has_counts = counts_opt.has_value() && counts_opt->defined();
  const bool has_indices = indices_opt.has_value() && indices_opt->defined();
  TORCH_CHECK(has_counts == has_indices, op, ": ", what, ": counts and indices come together");
  if (!has_counts) return;
  const at::Tensor& counts = *counts_opt;
  const at::Tensor& indices = *indices_opt;
  TORCH_CHECK(row_block >= 1 && col_block >= 1, op, ": ", what, ": block sizes must be >= 1, got (", row_block, ", ",
              col_block, ")");
  TORCH_CHECK(counts.scalar_type() == at::kInt && indices.scalar_type() == at::kInt, op, ": ", what,
              " tensors must be int32");
  TORCH_CHECK(counts.is_contiguous() && indices.is_contiguous(), op, ": ", what, " tensors must be contiguous");
  const int64_t rows = ceil_div(row_len, row_block), cols = ceil_div(col_len, col_block);
  TORCH_CHECK(counts.dim() == 3 && indices.dim() == 4 && indices.size(0) == counts.size(0) &&
                  indices.size(1) == counts.size(1) && indices.size(2) == counts.size(2),
              op, ": ", what, ": counts must be (B, H, N) and indices (B, H, N, W), got ", counts.sizes(), " and ",
              indices.sizes());
  TORCH_CHECK((counts.size(0) == 1 || counts.size(0) == B) && (counts.size(1) == 1 || counts.size(1) == H), op,
              ": ", what, ": batch/heads ", counts.size(0), ", ", counts.size(1), " must be 1 or (", B, ", ", H, ")");
  TORCH_CHECK(counts.size(2) == rows, op, ": ", what, " has ", counts.size(2), " rows, ", row_len,
              " positions at block ", row_block, " need ", rows);
  if (!check_values || counts.numel() == 0 || !counts.device().is_cpu()) return;
  const int64_t width = indices.size(3);
  const int32_t* c = counts.data_ptr<int32_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  for (int64_t r = 0; r < counts.numel(); ++r) {
    TORCH_CHECK(c[r] >= 0 && c[r] <= width && c[r] <= cols, op, ": ", what, ": a row keeps ", c[r],
                " blocks; counts must lie in [0, min(width ", width, ", blocks ", cols, ")]");
    const int32_t* row = idx + r * width;
    for (int64_t j = 0; j < c[r]; ++j) {
      TORCH_CHECK(row[j] >= 0 && row[j] < cols, op, ": ", what, ": block index ", row[j], " out of range [0, ", cols,
                  ")");
      TORCH_CHECK(j == 0 || row[j] > row[j - 1], op, ": ", what, ": block indices must be strictly ascending");
    }
  }
}

// Sequence lengths that become indices: an integer (B,) tensor, every value in [0, max_len] (checked in
// the tensor's own dtype, before any narrowing to int32: 2^32 + 5 must not become 5). Returns them as
// int32. GPU tensors are clamped to [0, max_len] instead of read (a read would synchronise the stream).
inline at::Tensor checked_lengths(const char* op, const char* what, const at::Tensor& lens, int64_t B,
                                  int64_t max_len) {
  TORCH_CHECK(at::isIntegralType(lens.scalar_type(), /*includeBool=*/false), op, ": ", what,
              " must be an integer tensor, got ", lens.scalar_type());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B, op, ": ", what, " must be (B,) = (", B, ",), got ", lens.sizes());
  if (!lens.device().is_cpu()) return lens.clamp(0, max_len).to(at::kInt).contiguous();
  if (B > 0) {
    const at::Tensor wide = lens.to(at::kLong);
    const int64_t lo = wide.min().item<int64_t>(), hi = wide.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= max_len, op, ": ", what, " must lie in [0, ", max_len, "], got [", lo, ", ", hi, "]");
  }
  return lens.to(at::kInt).contiguous();
}

// Score modifiers (conventions: softcap, mask, ALiBi, softmax with sinks): softcap >= 0 and finite (0: off);
// alibi_slopes a floating (H,) or (B, H) tensor; sinks a floating (H,) tensor; both on q's device.
inline void check_score_mod_args(const char* op, const at::Tensor& q, double softcap,
                                 const c10::optional<at::Tensor>& alibi_slopes,
                                 const c10::optional<at::Tensor>& sinks) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0: off), got ",
              softcap);
  const int64_t B = q.size(0), H = q.size(2);
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), op, ": alibi_slopes must be floating point, got ",
                s.scalar_type());
    TORCH_CHECK((s.dim() == 1 && s.size(0) == H) || (s.dim() == 2 && s.size(0) == B && s.size(1) == H), op,
                ": alibi_slopes must be (H,) = (", H, ",) or (B, H) = (", B, ", ", H, "), got ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), op, ": alibi_slopes must be on q's device");
  }
  if (sinks.has_value() && sinks->defined()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), op, ": sinks must be floating point, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 1 && s.size(0) == H, op, ": sinks must be (H,) = (", H, ",), got ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), op, ": sinks must be on q's device");
  }
}

// attn_bias: a floating (Bm, Hm, Sqm, Sk) tensor with Bm in {1, B}, Hm in {1, H}, Sqm in {1, Sq}, on q's device.
inline void check_attn_bias_arg(const char* op, const at::Tensor& q, const at::Tensor& k,
                                const c10::optional<at::Tensor>& attn_bias) {
  if (!attn_bias.has_value() || !attn_bias->defined()) return;
  const at::Tensor& t = *attn_bias;
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || t.scalar_type() == at::kBool, op,
              ": attn_bias must be floating point (additive) or bool (a mask), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && (t.size(0) == 1 || t.size(0) == q.size(0)) && (t.size(1) == 1 || t.size(1) == q.size(2)) &&
                  (t.size(2) == 1 || t.size(2) == q.size(1)) && t.size(3) == k.size(1),
              op, ": attn_bias must be (B|1, H|1, Sq|1, Sk) = (", q.size(0), "|1, ", q.size(2), "|1, ", q.size(1),
              "|1, ", k.size(1), "), got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), op, ": attn_bias must be on q's device");
}

// dropout_p in [0, 1) with, when > 0, dropout_seed: one int64 (the hash's seed, cpu/dropout.h) on q's device.
inline void check_dropout_args(const char* op, const at::Tensor& q, double dropout_p,
                               const c10::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must lie in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(dropout_seed.has_value() && dropout_seed->defined(), op, ": dropout_p > 0 needs a dropout_seed");
  const at::Tensor& s = *dropout_seed;
  TORCH_CHECK(s.scalar_type() == at::kLong && s.numel() == 1, op, ": dropout_seed must be one int64, got ",
              s.scalar_type(), " ", s.sizes());
  TORCH_CHECK(s.device() == q.device(), op, ": dropout_seed must be on q's device");
}

// Segment bounds (packed documents, varlen): an int32 contiguous (Bb, rows, 2) tensor, Bb in {1, B}, on q's
// device: row r sees the columns [lo, hi). On CPU its values are read: 0 <= lo <= hi <= cols, and both columns
// nondecreasing along the rows (the kernels take a tile's range from its first and last rows).
inline void check_bounds_arg(const char* op, const char* what, const at::Tensor& q,
                             const c10::optional<at::Tensor>& bounds, int64_t B, int64_t rows, int64_t cols) {
  if (!bounds.has_value() || !bounds->defined()) return;
  const at::Tensor& t = *bounds;
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), op, ": ", what, " must be a contiguous int32 tensor");
  TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == B) && t.size(1) == rows && t.size(2) == 2, op, ": ",
              what, " must be (B|1, ", rows, ", 2) with B = ", B, ", got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), op, ": ", what, " must be on q's device");
  if (!t.device().is_cpu()) return;
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t b = 0; b < t.size(0); ++b)
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t lo = p[(b * rows + r) * 2], hi = p[(b * rows + r) * 2 + 1];
      TORCH_CHECK(lo >= 0 && lo <= hi && hi <= cols, op, ": ", what, ": row ", r, " has [", lo, ", ", hi,
                  "), which must satisfy 0 <= lo <= hi <= ", cols);
      TORCH_CHECK(r == 0 || (lo >= p[(b * rows + r - 1) * 2] && hi >= p[(b * rows + r - 1) * 2 + 1]), op, ": ", what,
                  ": bounds must be nondecreasing along the rows (row ", r, ")");
    }
}

// Shape checks of decode_attn_fwd shared by its CPU and CUDA implementations. block_keep is a uint8
// (or bool) (Bm, Hm, Nq, Nk) bitmap with Bm in {1, B}, Hm in {1, H} covering every query and cache
// block the kernels look up.
// Returns the caches' logical length S_max: k.size(1), or with a block_table (B, max_pages) int32 of a paged cache
// (k, v: (num_pages, page, Hkv, D)) max_pages * page.
inline int64_t check_decode_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& block_keep, int64_t block_q, int64_t block_k,
                                 double softmax_scale, int64_t window_left, int64_t num_splits, int64_t map_cols,
                                 const c10::optional<at::Tensor>& block_table = c10::nullopt) {
  const bool paged = block_table.has_value() && block_table->defined();
  check_qkv_args(op, q, k, v, !paged);
  check_window_args(op, window_left, -1);
  check_scale_arg(op, softmax_scale);
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0: automatic), got ", num_splits);
  TORCH_CHECK(map_cols >= 0, op, ": map_cols must be >= 0, got ", map_cols);
  int64_t smax = k.size(1);
  if (paged) {
    const at::Tensor& table = *block_table;
    TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == q.size(0), op,
                ": block_table must be an int32 (B, max_pages) tensor with B = ", q.size(0), ", got ",
                table.scalar_type(), " ", table.sizes());
    TORCH_CHECK(table.device() == q.device(), op, ": block_table must be on q's device");
    TORCH_CHECK(k.size(1) >= 1, op, ": a paged cache needs pages of at least one row, got ", k.sizes());
    smax = table.size(1) * k.size(1);
  }
  if (!block_keep.has_value() || !block_keep->defined()) return smax;
  const at::Tensor& keep = *block_keep;
  TORCH_CHECK(keep.scalar_type() == at::kByte || keep.scalar_type() == at::kBool, op,
              ": block_keep must be uint8 or bool, got ", keep.scalar_type());
  TORCH_CHECK(block_q >= 1 && block_k >= 1, op, ": block sizes must be >= 1 with block_keep, got (", block_q, ", ",
              block_k, ")");
  TORCH_CHECK(keep.dim() == 4 && (keep.size(0) == 1 || keep.size(0) == q.size(0)) &&
                  (keep.size(1) == 1 || keep.size(1) == q.size(2)) && keep.size(2) >= ceil_div(q.size(1), block_q) &&
                  keep.size(3) >= ceil_div(smax, block_k),
              op, ": block_keep must be (B|1, H|1, >= ", ceil_div(q.size(1), block_q), ", >= ",
              ceil_div(smax, block_k), "), got ", keep.sizes());
  TORCH_CHECK(keep.device() == q.device(), op, ": block_keep must be on q's device");
  return smax;
}

// The pages a paged cache's lengths reach (the first ceil(len_b / page) entries of row b) lie in [0, num_pages):
// checked on the CPU (a GPU caller's kernel would need a host read per step; entries past a sequence's length are
// never read and may hold anything, as in flash_attn).
inline void check_pages_in_use(const char* op, const at::Tensor& table, const at::Tensor& lens, int64_t page,
                               int64_t num_pages) {
  if (!table.device().is_cpu()) return;
  const int32_t* t = table.data_ptr<int32_t>();
  const int32_t* l = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < table.size(0); ++b)
    for (int64_t j = 0; j < ceil_div(l[b], page); ++j) {
      const int32_t pg = t[b * table.size(1) + j];
      TORCH_CHECK(pg >= 0 && pg < num_pages, op, ": block_table[", b, ", ", j, "] = ", pg, " is not a page of the ",
                  "cache (", num_pages, " pages); sequence ", b, " holds ", l[b], " keys in pages of ", page);
    }
}

}  // namespace attnops
