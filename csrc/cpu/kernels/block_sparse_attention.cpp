// Block-sparse flash attention on the CPU: forward and backward.
//
// Forward: one task per (batch, head, query tile of <= 64 rows), run by run_tasks (dynamic,
// costliest first). A task walks only the key ranges its LUT row keeps (consecutive blocks
// merged into one range, cut into tiles of <= 256 keys), or the predicate range when there is no
// LUT (dense / causal / window). Per tile: S = Q K^T with the GEMM micro-kernel, the per-row
// predicate interval masked to -inf, an online softmax in base 2 (softmax_scale * log2(e) is
// folded into Q when it is packed), and O += P V. Accumulation in float (double for float64).
//
// Backward (FlashAttention-2 style, from the saved lse and delta = rowsum(dO * O) - dlse). Per key
// tile, over the query heads of its kv group and the query ranges of the transposed LUT:
//   P^T, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dv += P^T dO, dk += dS^T Q
// and dq in one of two deterministic ways (no two tasks ever write the same row, no atomics):
//   fused:     one task per (batch, kv head) owns its group's dq rows and adds dS K as it goes;
//   two-pass:  a dq pass per (batch, head, query tile) first, for when B * Hkv tasks are too few
//              to keep the threads busy (MQA, small batches).
// Memory: packed copies of q/k/v/dO (O(S * D)) and per-thread tiles; never Sq x Sk.
//
// Block attention map (return_block_map), fused into the forward: the softmax step leaves the tile's
// P = exp2(s - m_r) in place, so summing (or taking the max of) each row's P over the keys of one map
// block costs a pass over a tile already in L1. The lse is not known yet, so a row keeps per map
// block the value and the running max m_r it is relative to, rescaling when a later tile adds to the
// same block; at the end of the task p = value * exp2(m_r - lse2_r) is exact, and rows are pooled
// into the partial map (map_rows queries x map_cols keys). No second Q K^T, no Sq x Sk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/dropout.h"
#include "cpu/gemm.h"
#include "cpu/gemm_bf16.h"
#include "cpu/mask.h"
#include "cpu/pack.h"
#include "cpu/parallel.h"
#include "cpu/rows.h"
#include "cpu/score_mods.h"
#include "cpu/softmax.h"
#include "ops.h"

namespace attnops::cpu::ATTNOPS_ISA {
namespace {

constexpr int64_t kTileQ = 64;         // query rows per forward / dq task
constexpr int64_t kTileQWide = 256;    // the most query rows per forward task (no LUT or map: forward_tile_rows)
constexpr int64_t kTileK = 256;        // keys per S tile in the forward and dq pass
constexpr int64_t kTileKBwd = 64;      // the fewest keys per dk/dv task (backward_tiles: up to 4x)
constexpr int64_t kTileQBwd = 128;     // queries per S^T tile in the dk/dv pass with kTileKBwd keys (up to 2x)

// Shapes and strides shared by the passes. Strides are in elements; the head dim is contiguous.
struct Problem {
  int64_t B, Sq, Sk, H, Hkv, D, Dp, group;
  int64_t sq_b, sq_s, sq_h;  // q (and out, dout share the contiguous layout below)
  int64_t sk_b, sk_s, sk_h;
  int64_t sv_b, sv_s, sv_h;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t pad) {
  Problem p;
  p.B = q.size(0);
  p.Sq = q.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.Sk = k.size(1);
  p.Hkv = k.size(2);
  p.group = p.H / p.Hkv;
  p.Dp = round_up(p.D, pad);
  p.sq_b = q.stride(0), p.sq_s = q.stride(1), p.sq_h = q.stride(2);
  p.sk_b = k.stride(0), p.sk_s = k.stride(1), p.sk_h = k.stride(2);
  p.sv_b = v.stride(0), p.sv_s = v.stride(1), p.sv_h = v.stride(2);
  return p;
}

// Everything both operators take besides the tensors of their own: the LUT and its transpose (values
// read when `lut_values` / `tlut_values`: the forward never reads the transpose, it only saves it),
// block sizes, window and scale.
void check_core_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& kv_num_blocks, const c10::optional<at::Tensor>& kv_indices,
                     const c10::optional<at::Tensor>& q_num_blocks, const c10::optional<at::Tensor>& q_indices,
                     int64_t block_q, int64_t block_k, double softmax_scale, int64_t window_left, int64_t window_right,
                     bool tlut_values) {
  check_qkv_args(op, q, k, v);
  check_window_args(op, window_left, window_right);
  check_scale_arg(op, softmax_scale);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), Sk = k.size(1);
  check_lut_args(op, "block LUT (kv_num_blocks, kv_indices)", kv_num_blocks, kv_indices, B, H, Sq, Sk, block_q,
                 block_k, true);
  check_lut_args(op, "transposed block LUT (q_num_blocks, q_indices)", q_num_blocks, q_indices, B, H, Sk, Sq,
                 block_k, block_q, tlut_values);
  const bool has_lut = kv_num_blocks.has_value() && kv_num_blocks->defined();
  const bool has_tlut = q_num_blocks.has_value() && q_num_blocks->defined();
  TORCH_CHECK(has_lut || !has_tlut, op, ": a transposed block LUT without the block LUT");
}

// Segment bounds: key_bounds (per query) and query_bounds (per key, its transpose) come together; the forward
// reads only key_bounds (it takes the transpose so that autograd can save it), the backward both.
void check_segment_bounds(const char* op, const at::Tensor& q, const at::Tensor& k,
                          const c10::optional<at::Tensor>& key_bounds, const c10::optional<at::Tensor>& query_bounds,
                          bool backward) {
  const bool has_kb = key_bounds.has_value() && key_bounds->defined();
  const bool has_qb = query_bounds.has_value() && query_bounds->defined();
  TORCH_CHECK(has_kb || !has_qb, op, ": query_bounds without key_bounds");
  TORCH_CHECK(!backward || has_kb == has_qb, op, ": the backward needs both key_bounds and query_bounds");
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1);
  check_bounds_arg(op, "key_bounds", q, key_bounds, B, Sq, Sk);
  if (backward) check_bounds_arg(op, "query_bounds", q, query_bounds, B, Sk, Sq);
}

// ALiBi's per-query offsets (varlen layouts, Predicates::set_alibi_offsets): int32 (Sq,), with ALiBi and with segment
// bounds shared by the batch rows (every allowed pair must lie in a run of rows of one offset; the op builds both).
void check_alibi_offsets(const char* op, const at::Tensor& q, const c10::optional<at::Tensor>& alibi_slopes,
                         const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& key_bounds,
                         const c10::optional<at::Tensor>& query_bounds, bool backward) {
  if (!offsets.has_value() || !offsets->defined()) return;
  const at::Tensor& t = *offsets;
  TORCH_CHECK(alibi_slopes.has_value() && alibi_slopes->defined(), op, ": alibi_offsets without alibi_slopes");
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 1 && t.size(0) == q.size(1), op,
              ": alibi_offsets must be a contiguous int32 (Sq,) = (", q.size(1), ",) tensor, got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), op, ": alibi_offsets must be on q's device");
  const bool keys_shared = key_bounds.has_value() && key_bounds->defined() && key_bounds->size(0) == 1;
  const bool queries_shared = query_bounds.has_value() && query_bounds->defined() && query_bounds->size(0) == 1;
  const bool shared = keys_shared && (!backward || queries_shared);
  TORCH_CHECK(shared, op, ": alibi_offsets needs segment bounds shared by the batch rows (key_bounds",
              backward ? " and query_bounds" : "", " of batch 1)");
}

// Whether a (B, S, H, D) tensor (head dim contiguous) holds only finite values: one parallel pass,
// rows widened to the compute type (x - x is 0 unless x is NaN or Inf). A third of the time of
// at::isfinite(t).all(), which writes a bool tensor first.
template <typename S>
bool finite_rows(const at::Tensor& t) {
  using T = compute_t<S>;
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const int64_t L = t.size(1), H = t.size(2), D = t.size(3);
  const int64_t s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2);
  const S* base = t.data_ptr<S>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, t.size(0) * L * H, 256, [&](int64_t begin, int64_t end) {
    V acc{};
    T tail = 0;
    for (int64_t r = begin; r < end; ++r) {
      const S* row = base + (r / (L * H)) * s0 + ((r / H) % L) * s1 + (r % H) * s2;
      int64_t d = 0;
      for (; d + W <= D; d += W) {
        const V x = load_vec<T>(row + d);
        acc += x - x;
      }
      for (; d < D; ++d) tail += static_cast<T>(row[d]) - static_cast<T>(row[d]);
    }
    const T sum = hsum<T>(acc) + tail;
    if (sum != sum) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// Query (or key) tiles: with a LUT a tile never straddles two LUT rows.
int64_t tile_rows(const BlockLut& lut, int64_t preferred) {
  return lut.present() ? std::min(preferred, lut.row_block) : preferred;
}

// The rows of a tile whose span is not empty, first and count: one contiguous range, since every
// predicate and segment bound is monotone in the row (rows inside it with an empty span are handled
// as empty by the per-row code).
struct RowRange {
  int64_t first, count;
};
inline RowRange live_rows(const RowSpan* spans, int64_t rows) {
  int64_t a = 0, e = rows;
  while (a < e && spans[a].empty()) ++a;
  while (e > a && spans[e - 1].empty()) --e;
  return {a, e - a};
}

// The spans of rows [0, count) on the tile [t0, t1) whose first visible column is start: row i sees
// [max(lo(i), start), min(hi(i), t1)), relative to t0 (queries over keys in the forward and dq pass, keys over
// queries in the dk / dv pass). lo and hi are nondecreasing in i, so a tile inside [lo(count - 1), hi(0)) is whole
// for every row: one fill instead of a predicate evaluation a row. -> whether any row sees the tile.
template <typename Lo, typename Hi>
inline bool tile_spans(int64_t count, int64_t start, int64_t t0, int64_t t1, Lo lo, Hi hi, RowSpan* spans) {
  if (lo(count - 1) <= start && hi(0) >= t1) {
    std::fill(spans, spans + count, RowSpan{start - t0, t1 - t0});
    return true;
  }
  bool any = false;
  for (int64_t i = 0; i < count; ++i) {
    spans[i] = {std::max(lo(i), start) - t0, std::min(hi(i), t1) - t0};
    any |= !spans[i].empty();
  }
  return any;
}

// Rows per group of the forward's staircase tiles (for_each_row_group).
constexpr int64_t kStairRows = 64;

// The live rows of a key tile (width n, its first key on a panel boundary) as groups, each calling f(ra, nr, c0, c1)
// with the tile's columns [c0, c1) that its rows [ra, ra + nr) see: c0 a multiple of NR (a panel boundary, an even
// key for the bf16 pairs), c1 rounded up to the vector width. Where the spans form a staircase (a causal diagonal,
// a window's two edges, per-row key bounds such as MoBA's self pass of 512-key blocks) a group of kStairRows rows
// multiplies and exponentiates only its own columns; a 256 x 256 diagonal tile costs 5/8 of itself in groups of 64.
// The groups' spans are shifted to start at c0. One group, the whole tile, where groups would save under a fifth
// (a group is a GEMM call of its own) or where `whole` (the block map, whose partial sums take the task's columns).
// Rows that see none of the tile are skipped, as live_rows does: their max, sum and accumulator stay as they are.
template <typename T, typename F>
void for_each_row_group(RowSpan* spans, RowRange live, int64_t n, bool whole, F&& f) {
  constexpr int64_t NR = kGemmN<T>, W = Vec<T>::size;
  const int64_t end = live.first + live.count;
  auto columns = [&](int64_t a, int64_t e, int64_t& c0, int64_t& c1) {  // -> false: no row of [a, e) sees the tile
    int64_t lo = n, hi = 0;
    for (int64_t r = a; r < e; ++r)
      if (!spans[r].empty()) {
        lo = std::min(lo, std::max<int64_t>(spans[r].v0, 0));
        hi = std::max(hi, std::min(spans[r].v1, n));
      }
    c0 = lo / NR * NR;
    c1 = std::min(n, round_up(hi, W));
    return lo < hi;
  };
  if (!whole && live.count > kStairRows) {
    int64_t area = 0, c0, c1;
    for (int64_t a = live.first; a < end; a += kStairRows)
      if (columns(a, std::min(a + kStairRows, end), c0, c1)) area += (std::min(a + kStairRows, end) - a) * (c1 - c0);
    if (5 * area < 4 * live.count * n) {
      for (int64_t a = live.first; a < end; a += kStairRows) {
        const int64_t e = std::min(a + kStairRows, end);
        if (!columns(a, e, c0, c1)) continue;
        for (int64_t r = a; r < e; ++r) spans[r] = {spans[r].v0 - c0, spans[r].v1 - c0};
        const RowRange group = live_rows(spans + a, e - a);
        f(a + group.first, group.count, c0, c1);
      }
      return;
    }
  }
  f(live.first, live.count, int64_t(0), n);
}

// The key tiles (<= kTileK keys, starting on GEMM panel boundaries) that the query rows [r0, r1) of head h
// visit: the LUT row's segments, or the predicate range, cut into tiles. Sets each row's valid span
// in `spans` and calls f(t0, t1, n) for the tile [t0, t1) (n: its width padded to the vector width, the
// row passes' unit; the GEMMs run a last half panel as such), skipping tiles that no row sees. One walk
// for the forward and the dq pass.
// With key classes (the forward of a dilated mask: K and V packed class by class), tiles and spans are in packed
// positions: the rows' bounds map into their LUT row's class (one LUT row per task).
template <typename T, typename F>
void for_each_key_tile(const BlockLut& lut, const Predicates& pred, int64_t b, int64_t h, int64_t r0, int64_t r1,
                       int64_t Sk, RowSpan* spans, F&& f, const KeyClasses* classes = nullptr) {
  const int64_t row = lut.present() ? r0 / lut.row_block : 0;
  int64_t c = -1;  // the LUT row's class
  if (classes && classes->on() && lut.count(b, h, row) > 0)
    c = lut.indices[lut.base(b, h, row) * lut.width] % classes->stride;
  auto lo = [&](int64_t r) { return c < 0 ? pred.key_lo(b, r) : classes->packed_bound(pred.key_lo(b, r), c); };
  auto hi = [&](int64_t r) { return c < 0 ? pred.key_hi(b, r) : classes->packed_bound(pred.key_hi(b, r), c); };
  for_each_segment(
      lut, b, h, row, lo(r0), hi(r1 - 1), Sk,
      [&](int64_t a, int64_t e) {
        constexpr int64_t NR = kGemmN<T>;
        for (int64_t t0 = a / NR * NR, t1; t0 < e; t0 = t1) {
          t1 = std::min(t0 + kTileK, e);
          const bool any = tile_spans(
              r1 - r0, std::max(a, t0), t0, t1, [&](int64_t r) { return lo(r0 + r); },
              [&](int64_t r) { return hi(r0 + r); }, spans);
          if (any) f(t0, t1, round_up(t1 - t0, Vec<T>::size));
        }
      },
      c < 0 ? nullptr : classes);
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

// What the caller asked of the block map: partial sums (or maxima) over map_rows queries x map_cols
// keys; rows == 0 means no map. map_rows divides the forward's query tile (the op checks it).
struct MapSpec {
  int64_t rows = 0, cols = 0;
  bool max = false;
  bool on() const { return rows > 0; }
};

template <typename T>
struct FwdScratch {
  std::vector<T> q, s, acc, m, l, alpha;
  std::vector<RowSpan> spans;
  std::vector<uint32_t> drop_rows;  // the dropout hash's row keys of the task's queries
  // Block map, laid out (map key block, tile row): value and the running max it is relative to.
  // Blocks [map_lo, map_hi) have been touched by this task; tiles arrive in ascending key order.
  std::vector<T> map_val, map_ref;
  int64_t map_lo = 0, map_hi = 0;
  std::vector<uint32_t> q2, p2;  // bf16 products (cpu/gemm_bf16.h): Q rows and P rows as bf16 pairs
  // rows: the most query rows a task has (forward_tile_rows, fewer for a short query): a call at S = 16 would otherwise
  // allocate and zero 100 KB of scratch for 16 rows.
  FwdScratch(int64_t rows, int64_t D, int64_t Dp, int64_t map_blocks, bool dot)
      : q(dot ? 0 : rows * D), s(rows * kTileK), acc(rows * Dp), m(rows), l(rows), alpha(rows), spans(rows),
        drop_rows(rows), map_val(map_blocks * kTileQ), map_ref(map_blocks * kTileQ),
        q2(dot ? rows * ((D + 1) / 2) : 0), p2(dot ? rows * kTileK / 2 : 0) {}
};

template <typename T>
inline T segment_reduce(const T* p, int64_t a, int64_t e, bool take_max) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V acc{};
  int64_t i = a;
  for (; i + W <= e; i += W) acc = take_max ? vmax_nan<T>(vload(p + i), acc) : acc + vload(p + i);
  T r = take_max ? hmax<T>(acc) : hsum<T>(acc);
  for (; i < e; ++i) r = take_max ? (p[i] != p[i] ? p[i] : std::max(r, p[i])) : r + p[i];
  return r;
}

// Adds one tile's P (rows x columns [t0, t0 + n), valid spans) into the task's per-row map values.
template <typename T>
void map_add_tile(FwdScratch<T>& ws, const MapSpec& map, int64_t rows, int64_t t0) {
  for (int64_t r = 0; r < rows; ++r) {
    const RowSpan span = ws.spans[r];
    if (span.empty()) continue;
    const T* p = ws.s.data() + r * kTileK;
    const T m_now = ws.m[r];
    const int64_t j_first = (t0 + span.v0) / map.cols, j_last = (t0 + span.v1 - 1) / map.cols;
    // First touch of a block: nothing added yet. Tiles ascend, so the range mostly grows upwards.
    auto clear = [&](int64_t j) {
      std::fill_n(ws.map_val.begin() + j * kTileQ, kTileQ, T(0));
      std::fill_n(ws.map_ref.begin() + j * kTileQ, kTileQ, -std::numeric_limits<T>::infinity());
    };
    if (ws.map_hi <= ws.map_lo) ws.map_lo = ws.map_hi = j_first;
    while (ws.map_lo > j_first) clear(--ws.map_lo);
    for (; ws.map_hi <= j_last; ++ws.map_hi) clear(ws.map_hi);
    for (int64_t j = j_first; j <= j_last; ++j) {
      const int64_t a = std::max(span.v0, j * map.cols - t0), e = std::min(span.v1, (j + 1) * map.cols - t0);
      const T seg = segment_reduce(p, a, e, map.max);
      T& val = ws.map_val[j * kTileQ + r];
      T& ref = ws.map_ref[j * kTileQ + r];
      // m_r only grows, so older values are rescaled down to the current max.
      const T old = ref == -std::numeric_limits<T>::infinity() ? T(0) : val * exp2_scalar(ref - m_now);
      val = map.max ? (seg != seg ? seg : std::max(old, seg)) : old + seg;
      ref = m_now;
    }
  }
}

// Turns the task's values into probabilities with the final lse and pools its rows into the partial
// map rows it owns (every column written: blocks no row touched are exactly 0).
template <typename T, typename M>
void map_store_task(FwdScratch<T>& ws, const MapSpec& map, int64_t rows, int64_t r0, int64_t nk, M* part_bh) {
  for (int64_t pr = r0 / map.rows; pr * map.rows < r0 + rows; ++pr) std::fill_n(part_bh + pr * nk, nk, M(0));
  for (int64_t r = 0; r < rows; ++r) {
    if (ws.l[r] == T(0)) continue;  // no key: contributes nothing (the mean divides by rows that have one)
    const T lse2 = ws.m[r] + std::log2(ws.l[r]);
    M* prow = part_bh + ((r0 + r) / map.rows) * nk;
    for (int64_t j = ws.map_lo; j < ws.map_hi; ++j) {
      const T ref = ws.map_ref[j * kTileQ + r];
      if (ref == -std::numeric_limits<T>::infinity()) continue;
      const M pj = static_cast<M>(ws.map_val[j * kTileQ + r] * exp2_scalar(ref - lse2));
      prow[j] = map.max ? (pj != pj ? pj : std::max(prow[j], pj)) : prow[j] + pj;
    }
  }
  ws.map_lo = ws.map_hi = 0;
}

// Query rows per forward task: the LUT's rows (at most kTileQ) with a block LUT; kTileQ with a block map (its
// per-row scratch is laid out for kTileQ rows); else up to kTileQWide, as long as every thread keeps four tasks or
// more. Each task streams its key range's K and V panels once: at 16K keys they are no longer in a core's L2, and
// 64-row tiles read them 4x as often as SDPA's 256-row ones. Measured side by side in one process (Xeon with AMX,
// H = 8, 2 threads; 64 -> 256 rows): bf16 D = 128 causal N = 16384 1207 -> 938 ms, dense N = 4096 113 -> 97 ms;
// float32 D = 128 dense N = 4096 431 -> 369 ms; N = 1024 within the noise.
// A row's key tiles start at its task's first key, so under a window or key bounds the rows per task change the
// rounding: a deterministic schedule (ops.cpp) takes them from the shape alone, as for 8 threads.
int64_t forward_tile_rows(const BlockLut& lut, const MapSpec& map, int64_t heads, int64_t Sq) {
  if (lut.present()) return tile_rows(lut, kTileQ);
  if (map.on()) return kTileQ;
  const int64_t wanted = 4 * (deterministic_schedule() ? 8 : at::get_num_threads());
  int64_t rows = kTileQ;
  while (rows < kTileQWide && heads * ((Sq + 2 * rows - 1) / (2 * rows)) >= wanted) rows *= 2;
  return rows;
}

template <typename S>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const BlockLut& lut,
                    const Predicates& pred, double softmax_scale, const ScoreMods<compute_t<S>>& mods,
                    const ScoreBias<compute_t<S>>& bias, const Dropout& drop, const MapSpec& map, at::Tensor& out,
                    at::Tensor& lse, at::Tensor& map_part, at::Tensor& max_scores) {
  using T = compute_t<S>;
  constexpr int64_t NR = kGemmN<T>;
  const Problem p = make_problem(q, k, v, NR);
  const int64_t Sk_pad = round_up(p.Sk, NR);
  const T c = static_cast<T>(softmax_scale * kLog2e);

  // bf16 inputs at a level with bf16 products (cpu/gemm_bf16.h) multiply in bf16, unless V holds NaN/Inf
  // (found while packing it): then only the float path's exact rerun (below) keeps 0 * NaN away from rows
  // that never see that key.
  // With V finite a non-finite accumulator row can only come from that row's own NaN/Inf scores, which
  // the rerun would not change, so the bf16 path never needs the float panels.
  constexpr bool kDot = kDotFor<S>;
  const int64_t D2 = (p.D + 1) / 2, Sk2 = (p.Sk + 1) / 2;
  const S* qp = q.data_ptr<S>();
  const S* kp = k.data_ptr<S>();
  const S* vp = v.data_ptr<S>();
  // A dilated block mask (every LUT row's blocks of one residue class mod some stride): K and V packed class by
  // class (KeyClasses, cpu/mask.h), so that a row's blocks are one run of keys and its tiles kTileK wide, not one
  // block each; where nothing reads a key's position but the predicates (no ALiBi, bias, dropout, block map or
  // token bounds). ATTNOPS_CPU_KEY_CLASSES=0 turns it off.
  const bool classes_allowed =
      key_classes_on() && !pred.kb && !mods.alibi() && !bias.present() && !drop.on() && !map.on();
  const KeyClasses classes = classes_allowed ? key_classes(lut, p.Sk, NR) : KeyClasses();
  // K / V rows [r0, r1) of the packed order as runs of the key rows: f(x0, x1, shift), packed row x holding key
  // row x + shift (one run without key classes)
  auto for_key_runs = [&](int64_t r0, int64_t r1, auto&& f) {
    if (!classes.on()) return f(r0, r1, int64_t(0));
    for (int64_t x0 = r0, x1; x0 < r1; x0 = x1) {
      const int64_t x = x0 / classes.block;
      x1 = std::min(r1, (x + 1) * classes.block);
      f(x0, x1, (classes.key_block(x) - x) * classes.block);
    }
  };
  constexpr int64_t kPackRows = 256;  // a multiple of NR and even: chunks start on panel and pair boundaries
  const int64_t pack_chunks = (p.Sk + kPackRows - 1) / kPackRows;
  // Packs (b, kv head) pairs [g0, g1) into the wave's panels (slot bh - g0).
  auto for_pack_chunks = [&](int64_t g0, int64_t g1, auto&& pack) {
    const int64_t chunks = (g1 - g0) * pack_chunks;
    at::parallel_for(0, chunks, serial_grain(chunks, (g1 - g0) * p.Sk * p.D), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = g0 + t / pack_chunks, r0 = (t % pack_chunks) * kPackRows;
        pack(bh - g0, bh / p.Hkv, bh % p.Hkv, r0, std::min(r0 + kPackRows, p.Sk));
      }
    });
  };

  const int64_t TQ = forward_tile_rows(lut, map, p.B * p.H, p.Sq);
  const int64_t q_tiles = (p.Sq + TQ - 1) / TQ;
  // The (b, kv head) pairs run in waves: a wave's K / V panels are packed, its query tiles run, and the next wave
  // reuses the panels. Packing every pair up front took B Hkv Sk (D + Dp) values (134 MB at 32K keys, 8 heads,
  // D = 64), freshly mapped and faulted in on every call; a wave keeps near forward_wave_bytes() (16 MiB, below
  // glibc's largest mmap threshold, so the buffer comes back from the heap) of panels, with enough query tiles
  // for every thread.
  const int64_t pairs = p.B * p.Hkv;
  const int64_t pair_bytes = (Sk_pad * p.D + p.Dp * p.Sk) * static_cast<int64_t>(sizeof(T));
  const int64_t pair_tasks = p.group * q_tiles;  // pair bh's tasks: [bh pair_tasks, (bh + 1) pair_tasks)
  if (pair_tasks == 0 || pairs == 0) return;  // no query rows: nothing to pack
  const int64_t min_pairs = (8 * at::get_num_threads() + pair_tasks - 1) / pair_tasks;
  const int64_t wave =
      std::min(pairs, std::max<int64_t>({1, pair_bytes > 0 ? forward_wave_bytes() / pair_bytes : pairs, min_pairs}));

  // Per wave, per (b, kv head): K^T and V as bf16-pair panels (D2 x Sk_pad and Sk2 x Dp words, zero-padded) for
  // the bf16 products, checking V on the way; or as float GEMM panels (cpu/gemm.h), K^T (D x Sk_pad) and
  // V (Sk x Dp). The choice is the wave's: a wave whose V holds NaN/Inf runs the float path.
  // The panels live in workspaces (kept between calls: ops.h), taken when a wave first needs them; every element
  // a product reads is written by the wave's pack (the padding included), so a reused buffer needs no clearing.
  Workspace pairs_ws, panels_ws;
  uint32_t* kt2 = nullptr;
  uint32_t* v2 = nullptr;
  T* kt = nullptr;
  T* vb = nullptr;
  const bool dot_level = kDot && bf16_dot();
  // the amx level: the bf16 products through oneDNN's brgemm (AMX tiles), K^T and V each one VNNI block (rows of
  // Sk_pad and Dp words) so that a key tile's Q K^T and P V are one call each (brgemm_bf16); else 32-word panels
  const bool brgemm = dot_level && bf16_brgemm();
  const int64_t k_ldb = brgemm ? Sk_pad : NR, v_ldb = brgemm ? p.Dp : NR;  // the layouts' block widths
  auto pack_wave = [&](int64_t g0, int64_t g1) {  // -> whether the wave runs the bf16 products
    bool dot = dot_level;
    if constexpr (kDot) {
      if (dot) {
        if (!pairs_ws.taken()) {
          const int64_t kt2_words = round_up(wave * Sk_pad * D2, 16);  // 64-byte aligned V panels
          kt2 = static_cast<uint32_t*>(pairs_ws.take((kt2_words + wave * p.Dp * Sk2) * int64_t(sizeof(uint32_t))));
          v2 = kt2 + kt2_words;
        }
        std::atomic<bool> v_finite{true};
        for_pack_chunks(g0, g1, [&](int64_t slot, int64_t b, int64_t hk, int64_t r0, int64_t r1) {
          for_key_runs(r0, r1, [&](int64_t x0, int64_t x1, int64_t shift) {
            pack_transposed_pairs<NR>(kp + b * p.sk_b + hk * p.sk_h + shift * p.sk_s, p.sk_s, x0, x1, p.D,
                                      kt2 + slot * Sk_pad * D2, x1 == p.Sk, k_ldb);
            if (!pack_row_pairs<NR>(vp + b * p.sv_b + hk * p.sv_h + shift * p.sv_s, p.sv_s, x0, x1, p.Sk, p.D, p.Dp,
                                    v2 + slot * p.Dp * Sk2, v_ldb))
              v_finite.store(false, std::memory_order_relaxed);
          });
        });
        dot = v_finite.load();
      }
    }
    if (!dot) {
      if (!panels_ws.taken()) {
        const int64_t kt_elems = round_up(wave * Sk_pad * p.D, 64 / int64_t(sizeof(T)));
        kt = static_cast<T*>(panels_ws.take((kt_elems + wave * p.Dp * p.Sk) * int64_t(sizeof(T))));
        vb = kt + kt_elems;
        zero_padding_panels<NR>(kt, wave, p.Sk, p.D);
      }
      for_pack_chunks(g0, g1, [&](int64_t slot, int64_t b, int64_t hk, int64_t r0, int64_t r1) {
        for_key_runs(r0, r1, [&](int64_t x0, int64_t x1, int64_t shift) {
          pack_transposed_panels<NR>(kp + b * p.sk_b + hk * p.sk_h + shift * p.sk_s, p.sk_s, x0, x1, p.D, T(1),
                                     kt + slot * Sk_pad * p.D);
          pack_row_panels<NR>(vp + b * p.sv_b + hk * p.sv_h + shift * p.sv_s, p.sv_s, x0, x1, p.D, p.Dp, p.Sk, T(1),
                              vb + slot * p.Dp * p.Sk);
        });
      });
    }
    return dot;
  };

  S* op = out.data_ptr<S>();
  auto* lp = lse.data_ptr<compute_t<S>>();
  auto* mxp = max_scores.numel() ? max_scores.data_ptr<compute_t<S>>() : nullptr;
  const int64_t so_b = out.stride(0), so_s = out.stride(1), so_h = out.stride(2);

  auto task_rows = [&](int64_t t, int64_t& b, int64_t& h, int64_t& r0, int64_t& r1) {
    b = t / (p.H * q_tiles);
    h = (t / q_tiles) % p.H;
    r0 = (t % q_tiles) * TQ;
    r1 = std::min(r0 + TQ, p.Sq);
  };
  auto cost = [&](int64_t t) {
    int64_t b, h, r0, r1;
    task_rows(t, b, h, r0, r1);
    int64_t keys = 0;
    for_each_segment(lut, b, h, lut.present() ? r0 / lut.row_block : 0, pred.key_lo(b, r0), pred.key_hi(b, r1 - 1),
                     p.Sk, [&](int64_t a, int64_t e) { keys += e - a; });
    return keys;
  };

  const int64_t map_nk = map.on() ? (p.Sk + map.cols - 1) / map.cols : 0;
  const int64_t map_nq = map.on() ? (p.Sq + map.rows - 1) / map.rows : 0;
  auto* mp = map.on() ? map_part.data_ptr<compute_t<S>>() : nullptr;

  bool dot = false;  // the current wave's
  int64_t g0 = 0;    // its first (b, kv head) pair
  auto work = [&](int64_t t, FwdScratch<T>& ws) {
    int64_t b, h, r0, r1;
    task_rows(t, b, h, r0, r1);
    const int64_t rows = r1 - r0, hk = h / p.group, slot = b * p.Hkv + hk - g0;
    const T slope2 = mods.slope2(b, h);
    const T* ktile = kt + slot * Sk_pad * p.D;
    const T* vtile = vb + slot * p.Dp * p.Sk;
    const uint32_t* k2tile = kt2 + slot * Sk_pad * D2;
    const uint32_t* v2tile = v2 + slot * p.Dp * Sk2;
    if (dot) {  // Q as it is (the scale is applied to the float scores: no second rounding)
      if constexpr (kDot)
        pack_transposed_pairs<1>(qp + b * p.sq_b + h * p.sq_h + r0 * p.sq_s, p.sq_s, 0, rows, p.D, ws.q2.data());
    } else {
      pack_rows(qp + b * p.sq_b + h * p.sq_h + r0 * p.sq_s, p.sq_s, 0, rows, p.D, c, ws.q.data(), p.D);
    }
    if (drop.on())
      for (int64_t r = 0; r < rows; ++r) ws.drop_rows[r] = drop.row_key(b * p.H + h, r0 + r);
    // exact: P V row by row over each row's own keys. Run only when the tile GEMMs left a non-finite
    // accumulator: V holds NaN/Inf somewhere, and 0 * NaN would have reached rows that never
    // attend that key (the run below redoes the task; finite inputs never pay for it).
    // Where nothing reads P in float (no block map, no dropout), the bf16 products' softmax writes P as bf16 pairs
    // straight from the exponential (softmax_rows_to_bf16): plain scores take the scale in the exponent, modified ones
    // take it in their own pass (modify_mask_max), which gives their maxima: two passes over the tile, not four (a
    // scaling pass, the modifiers' pass, exp, the bf16 conversion)
    const bool modified = mods.on_scores() || bias.present();
    const bool p_unread = dot && !map.on() && !drop.on();
    const bool p_to_bf16 = p_unread && c > 0 && !modified;
    const bool mod_to_bf16 = p_unread && modified;
    auto run = [&](bool exact) {
      std::fill(ws.m.begin(), ws.m.end(), -std::numeric_limits<T>::infinity());
      std::fill(ws.l.begin(), ws.l.end(), T(0));
      std::fill(ws.acc.begin(), ws.acc.end(), T(0));
      ws.map_lo = ws.map_hi = 0;
      // the tile [t0, t1) (n: its width padded) for the rows [ra, ra + nr)
      auto tile = [&](int64_t t0, int64_t t1, int64_t n, int64_t ra, int64_t nr) {
        if (dot) {
          if constexpr (kDot)
            gemm_bf16_via(brgemm, nr, n, D2, ws.q2.data() + ra * D2, D2, k2tile + pair_column(t0, D2, k_ldb), D2 * NR,
                          ws.s.data() + ra * kTileK, kTileK, false, nullptr,
                          p_to_bf16 || modified ? 1.0f : static_cast<float>(c), k_ldb);
        } else {
          gemm<T>(nr, n, p.D, ws.q.data() + ra * p.D, p.D, ktile + t0 * p.D, p.D * NR, ws.s.data() + ra * kTileK,
                  kTileK, false);
        }
        // acc = alpha acc + P V from P's bf16 pairs (FlashAttention's P V in the input type)
        auto p_times_v = [&] {
          if constexpr (kDot)
            gemm_bf16_via(brgemm, nr, p.Dp, (t1 - t0 + 1) / 2, ws.p2.data() + ra * (kTileK / 2), kTileK / 2,
                          v2tile + (t0 / 2) * v_ldb, Sk2 * NR, ws.acc.data() + ra * p.Dp, p.Dp, true,
                          ws.alpha.data() + ra, 1.0f, v_ldb);
        };
        if (p_to_bf16) {  // P straight to bf16 pairs, the scale in the exponent
          if constexpr (kDot)
            softmax_rows_to_bf16(ws.s.data() + ra * kTileK, kTileK, nr, n, ws.spans.data() + ra, c, ws.m.data() + ra,
                                 ws.l.data() + ra, ws.alpha.data() + ra, ws.p2.data() + ra * (kTileK / 2), kTileK / 2);
          p_times_v();
          return;
        }
        // P's exponential: the cubic where P is rounded to bf16 for its product (exp2_p), as in the step above
        if (!modified) {
          with_p_exp<kDot>(dot, [&](auto bf16p) {
            softmax_rows<T, decltype(bf16p)::value>(ws.s.data() + ra * kTileK, kTileK, nr, n, ws.spans.data() + ra,
                                                    ws.m.data() + ra, ws.l.data() + ra, ws.alpha.data() + ra);
          });
        } else {
          alignas(64) T row_max[kTileQWide];  // mod_to_bf16: the modified rows' maxima
          for (int64_t r = ra; r < ra + nr; ++r) {
            T* srow = ws.s.data() + r * kTileK;
            if (ws.spans[r].empty()) {
              if (mod_to_bf16) row_max[r - ra] = -std::numeric_limits<T>::infinity();
              else softmax_row(srow, n, ws.spans[r], ws.m[r], ws.l[r], ws.alpha[r]);
              continue;
            }
            alignas(64) T bias_run[ScoreBias<T>::kMaxRun];  // one pass: modifiers, mask, max
            const T mt = modify_mask_max(
                mods, srow, n, ws.spans[r], slope2, static_cast<T>(r0 + r + pred.alibi_offset_q(r0 + r) - t0),
                bias.present() ? bias.values(b, h, r0 + r, t0, false, t1 - t0, bias_run).first : nullptr, t1 - t0,
                dot ? static_cast<T>(c) : T(1));
            if (mod_to_bf16) {
              row_max[r - ra] = mt;
              continue;
            }
            with_p_exp<kDot>(dot, [&](auto bf16p) {
              softmax_row_exp<T, decltype(bf16p)::value>(srow, n, mt, ws.m[r], ws.l[r], ws.alpha[r]);
            });
          }
          if (mod_to_bf16) {
            if constexpr (kDot)
              softmax_rows_to_bf16(ws.s.data() + ra * kTileK, kTileK, nr, n, ws.spans.data() + ra, 1.0f,
                                   ws.m.data() + ra, ws.l.data() + ra, ws.alpha.data() + ra,
                                   ws.p2.data() + ra * (kTileK / 2), kTileK / 2, row_max);
          }
        }
        if (map.on()) map_add_tile(ws, map, rows, t0);  // the map is of the probabilities before dropout
        if (drop.on())  // after the row sums: dropout acts on the normalised probabilities, l is theirs
          for (int64_t r = ra; r < ra + nr; ++r)
            if (!ws.spans[r].empty()) drop.apply_row(ws.s.data() + r * kTileK, n, ws.drop_rows[r], t0);
        if (dot) {  // P rounded to bf16 pairs along the keys
          if constexpr (kDot)
            if (!mod_to_bf16)
              for (int64_t r = ra; r < ra + nr; ++r)
                to_bf16_pairs(ws.s.data() + r * kTileK, t1 - t0, ws.p2.data() + r * (kTileK / 2));
          p_times_v();
        } else if (exact)
          gemm_in_spans<T>(nr, ws.spans.data() + ra, p.Dp, ws.s.data() + ra * kTileK, kTileK, vtile + t0 * NR,
                           p.Sk * NR, ws.acc.data() + ra * p.Dp, p.Dp, true, ws.alpha.data() + ra);
        else
          gemm<T>(nr, p.Dp, t1 - t0, ws.s.data() + ra * kTileK, kTileK, vtile + t0 * NR, p.Sk * NR,
                  ws.acc.data() + ra * p.Dp, p.Dp, true, ws.alpha.data() + ra);
      };
      for_each_key_tile<T>(
          lut, pred, b, h, r0, r1, p.Sk, ws.spans.data(),
          [&](int64_t t0, int64_t t1, int64_t n) {
            // Only rows [ra, rb) see the tile (a tile straddling two packed documents, or a causal diagonal):
            // the products skip the others, whose running max, sum and accumulator stay as they are; on a
            // staircase, groups of rows take only their own columns
            for_each_row_group<T>(ws.spans.data(), live_rows(ws.spans.data(), rows), n, map.on(),
                                  [&](int64_t ra, int64_t nr, int64_t c0, int64_t c1) {
                                    tile(t0 + c0, std::min(t1, t0 + c1), c1 - c0, ra, nr);
                                  });
          },
          &classes);
    };
    run(false);
    if (!dot && !all_finite(ws.acc.data(), rows * p.Dp)) run(true);
    if (dot && brgemm) at::native::cpublas::brgemm_release();  // hands back the AMX tile state

    for (int64_t r = 0; r < rows; ++r) {
      S* orow = op + b * so_b + (r0 + r) * so_s + h * so_h;
      auto* lrow = lp + (b * p.H + h) * p.Sq + r0 + r;
      // the row's largest score (base 2 in m; -inf where it attends nothing), before the sink joins m
      if (mxp) mxp[(b * p.H + h) * p.Sq + r0 + r] = ws.m[r] * static_cast<T>(kLn2);
      // the sink joins the denominator (and leaves m, l sink-inclusive for the block map)
      const T alpha = mods.sinks() ? fold_sink(mods.sink2(h), ws.m[r], ws.l[r]) : T(1);
      const T l = ws.l[r];
      if (l == T(0)) {  // nothing to attend to: zeros and lse = -inf, never NaN
        std::fill(orow, orow + p.D, static_cast<S>(0.0f));
        *lrow = -std::numeric_limits<T>::infinity();
      } else if (alpha == T(0)) {  // no key, a sink: zeros and lse = the sink
        std::fill(orow, orow + p.D, static_cast<S>(0.0f));
        *lrow = static_cast<T>((ws.m[r] + std::log2(l)) * kLn2);
      } else {
        store_row(ws.acc.data() + r * p.Dp, p.D, alpha / l, orow);
        *lrow = static_cast<T>((ws.m[r] + std::log2(l)) * kLn2);
      }
    }
    if (map.on()) map_store_task(ws, map, rows, r0, map_nk, mp + (b * p.H + h) * map_nq * map_nk);
  };
  for (g0 = 0; g0 < pairs; g0 += wave) {
    const int64_t g1 = std::min(g0 + wave, pairs), t0 = g0 * pair_tasks;
    dot = pack_wave(g0, g1);
    run_tasks(
        (g1 - g0) * pair_tasks, [&](int64_t i) { return cost(t0 + i); },
        [&] { return FwdScratch<T>(std::min(TQ, p.Sq), p.D, p.Dp, map_nk, dot); },
        [&](int64_t i, FwdScratch<T>& ws) { work(t0 + i, ws); }, std::min(TQ, p.Sq) * 2 * p.D);
  }
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// Operands of one backward call, packed once (GEMM panels, cpu/gemm.h), plus per-row lse in base 2
// and delta = rowsum(dO * O) - dlse, both padded to Sq_pad. The per-head buffers hold the (b, head)
// pairs from bh0 on: all of them, or a wave's (the fused pass's waves).
// With bf16 products (`dot`, bf16 inputs at a level that has them: cpu/gemm_bf16.h), q and dO are held as bf16
// pairs instead, unscaled (the scales multiply the float products): q^T, dO^T as word panels over the queries
// (D2 x Sq_pad words), and q, dO as row-pair panels (ceil(Sq / 2) x Dp words), the B operands of S^T = K q^T,
// dP^T = V dO^T, dv = P^T dO and dk = dS^T q.
template <typename T>
struct BwdOperands {
  int64_t Sq_pad, Sk_pad, bh0 = 0;
  bool dot = false;
  bool brgemm = false;  // `dot` through oneDNN's brgemm (the amx level; the fused dq as dq^T = K^T dS^T)
  // The bf16-pair layouts' block widths (pair_column), for the packs and the products alike: 32-word panels, or at
  // the amx level one VNNI block each (a tile's product one brgemm call): the transposed operands (q^T, dO^T; K^T,
  // V^T) in rows of Sq_pad / Sk_pad words, the row-pair ones (dO, q, K) in rows of Dp words.
  int64_t qt_ld = 0, kt_ld = 0, row_ld = 0;
  double softmax_scale = 0;
  T *qt = nullptr, *dot_t = nullptr, *dor = nullptr, *qs = nullptr;  // per (b, head): (c q)^T, dO^T (D x Sq_pad),
                                                                      // dO, (scale q) (Sq x Dp)
  uint32_t *qt2 = nullptr, *dot2 = nullptr, *dor2 = nullptr, *qs2 = nullptr;  // `dot`: their bf16-pair forms
  T *kt = nullptr, *vt = nullptr, *kr = nullptr;  // per (b, kv head), two-pass only: K^T, V^T (D x Sk_pad), K (Sk x Dp)
  uint32_t *kt2 = nullptr, *vt2 = nullptr, *kr2 = nullptr;  // `dot`: as bf16 pairs (D2 x Sk_pad, ceil(Sk / 2) x Dp)
  T *lse2 = nullptr, *delta = nullptr;            // per (b, head): (Sq_pad)
  std::vector<at::Tensor> storage;

  uint32_t* words(int64_t n, const at::Tensor& like) {  // a buffer of n words, held by `storage`
    storage.push_back(at::empty({n}, like.options().dtype(at::kInt)));
    return reinterpret_cast<uint32_t*>(storage.back().template data_ptr<int32_t>());
  }
};

// Gradients sum thousands of tile products (dv of an early key under causal GQA-8 attention at
// Sq = 200 sums 1600 rows): one sequential float sum there was 4x less accurate than PyTorch's
// blocked matmuls in float32. So each tile product goes into a fresh float partial, and partials are
// summed across tiles and heads in double (a few thousand adds per tile of ~1M flops).
using GradAcc = double;

template <typename T>
inline void add_into(GradAcc* acc, const T* partial, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += partial[i];
}

// acc[i, d] += partial_t[d, i] for i < rows, d < cols (a product computed transposed: dq^T at the amx level)
template <typename T>
inline void add_transposed_into(GradAcc* acc, int64_t ld_acc, const T* partial_t, int64_t ld_partial, int64_t rows,
                                int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < cols; ++d) acc[i * ld_acc + d] += partial_t[d * ld_partial + i];
}

template <typename T>
struct DqScratch {
  std::vector<T> q, dout, s, dp, partial, capgrad, drop;
  std::vector<uint32_t> q2, dout2, ds2;  // bf16 products: q, dO rows as pairs along D, dS rows as pairs along keys
  std::vector<GradAcc> acc;
  std::vector<RowSpan> spans;
  // rows: the most query rows a task has (kTileQ, fewer for a short query), as FwdScratch and KeyTileScratch
  DqScratch(int64_t rows, int64_t D, int64_t Dp, bool softcap, bool dot)
      : q(dot ? 0 : rows * D), dout(dot ? 0 : rows * D), s(rows * kTileK), dp(rows * kTileK),
        partial(rows * Dp), capgrad(softcap ? rows * kTileK : 0), drop(kTileK),
        q2(dot ? rows * ((D + 1) / 2) : 0), dout2(dot ? rows * ((D + 1) / 2) : 0), ds2(dot ? rows * kTileK / 2 : 0),
        acc(rows * Dp), spans(rows) {}
};

// The backward's tile shape: keys per key tile (its layouts' key count; a block LUT's tiles may be shorter) and
// queries per S^T tile.
struct BwdTiles {
  int64_t keys = kTileKBwd, queries = kTileQBwd;
};

// Wider tiles for long sequences: 64 x 128 tiles added every tile product into the double accumulators (dq's
// rows swept once per 64 keys, dk / dv's once per 128 queries), ~10% of a dense D = 128 backward. Up to 256 x 256,
// while a (b, kv head) keeps at least 4 key tiles (the chunked form splits its keys by tiles) and a key's span of
// queries (a window's width, half the sequence under causal masking) holds 4 tiles: the rows of a key tile's S^T
// that its keys do not see are products spent on masked scores (a 256-key tile under a 256-query window: half).
inline BwdTiles backward_tiles(const Predicates& pred, int64_t Sk) {
  const int64_t mid = Sk / 2, span = Sk > 0 ? pred.query_hi(0, mid) - pred.query_lo(0, mid) : 0;
  BwdTiles tiles;
  while (tiles.keys < 4 * kTileKBwd && 4 * 2 * tiles.keys <= std::min(Sk, span)) tiles.keys *= 2;
  tiles.queries = std::min(2 * tiles.keys, 2 * kTileQBwd);
  return tiles;
}

template <typename T>
struct KeyTileScratch {
  int64_t tk, tq;  // the tile shape (BwdTiles): strides of the layouts below
  std::vector<T> k, v, kpanel, s, dp, partial, capgrad, drop, bias_t;
  std::vector<uint32_t> drop_rows;  // the dropout hash's row keys of the tile's queries
  // bf16 products: K, V rows and K's row-pair panels (over the tile's keys); P^T and dS^T rows as pairs along
  // the queries, and dS as pairs along the keys (word (j2, i) at j2 tq + i)
  std::vector<uint32_t> k2, v2, kpair, p2, ds2, dsq2;
  // fused with brgemm (the amx level): K^T's bf16 rows over the tile's keys (D x tk halves, two a word), the A
  // operand of dq^T = K^T dS^T
  std::vector<uint32_t> kt_rows;
  std::vector<GradAcc> dk, dv, dq;
  std::vector<RowSpan> spans;
  // keys: the most keys a tile has (tiles.keys, fewer for a short key sequence or a LUT's short blocks: the buffers
  // indexed by the tile's keys are zeroed when built, ~200 KB at 64 keys, which a 16-token call paid on every call)
  KeyTileScratch(int64_t D, int64_t Dp, BwdTiles tiles, int64_t keys, int64_t dq_rows, bool softcap, bool bias,
                 bool dot)
      : tk(tiles.keys), tq(tiles.queries), k(dot ? 0 : keys * D), v(dot ? 0 : keys * D),
        kpanel(dot ? 0 : tk * Dp), s(keys * tq), dp(keys * tq), partial(std::max(tk, tq) * Dp),
        capgrad(softcap ? keys * tq : 0), drop(tq), bias_t(bias ? keys * tq : 0), drop_rows(tq),
        k2(dot ? keys * ((D + 1) / 2) : 0), v2(dot ? keys * ((D + 1) / 2) : 0), kpair(dot ? tk / 2 * Dp : 0),
        p2(dot ? keys * tq / 2 : 0), ds2(dot ? keys * tq / 2 : 0), dsq2(dot ? tk / 2 * tq : 0),
        kt_rows(dot ? D * tk / 2 : 0), dk(keys * Dp), dv(keys * Dp), dq(dq_rows * Dp), spans(keys) {}
};

// The dq accumulator of a fused task: the group's rows [row0, row0 + rows), (group, rows, Dp), which
// the task owns. Its rows cover every query that sees the task's keys, from the query panel (NR rows)
// that holds the first: tiles start on panel boundaries.
struct DqRows {
  GradAcc* acc = nullptr;  // null: two passes, dq has its own pass
  int64_t row0 = 0, rows = 0;
};

// dk, dv of the keys [c0, c1) of kv head hk, over the query heads of its group. Fused (dq.acc set), also
// adds dS K into dq's rows.
template <typename S, typename T>
void key_tile_backward(const Problem& p, const BwdOperands<T>& ops, const BlockLut& tlut, const Predicates& pred,
                       const ScoreMods<T>& mods, const ScoreBias<T>& bias, const Dropout& drop, T* dbias, const S* kp,
                       const S* vp, int64_t b, int64_t hk, int64_t c0, int64_t c1, const DqRows& dq, bool exact,
                       KeyTileScratch<T>& ws, S* dkp, S* dvp) {
  const bool fused = dq.acc != nullptr;
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  constexpr int64_t NR = kGemmN<T>;
  const int64_t keys = c1 - c0, TQ = ws.tq, TKL = ws.tk;  // TKL: the layouts' keys (KeyTileScratch)
  const S* ksrc = kp + b * p.sk_b + hk * p.sk_h + c0 * p.sk_s;
  const S* vsrc = vp + b * p.sv_b + hk * p.sv_h + c0 * p.sv_s;
  // bf16 products (ops.dot): K and V rows as they are, pairs along D; K as row pairs for dS K
  const int64_t D2 = (p.D + 1) / 2, Sq2 = (p.Sq + 1) / 2, keys2 = (keys + 1) / 2;
  const bool dot = ops.dot;
  if (dot) {
    if constexpr (kDotFor<S>) {
      pack_transposed_pairs<1>(ksrc, p.sk_s, 0, keys, p.D, ws.k2.data());
      pack_transposed_pairs<1>(vsrc, p.sv_s, 0, keys, p.D, ws.v2.data());
      if (fused && ops.brgemm) pack_transposed_rows(ksrc, p.sk_s, keys, p.D, TKL / 2, ws.kt_rows.data());
      else if (fused) pack_row_pairs<NR>(ksrc, p.sk_s, 0, keys, keys, p.D, p.Dp, ws.kpair.data());
    }
  } else {
    pack_rows(ksrc, p.sk_s, 0, keys, p.D, T(1), ws.k.data(), p.D);
    pack_rows(vsrc, p.sv_s, 0, keys, p.D, T(1), ws.v.data(), p.D);
    if (fused) pack_row_panels<NR>(ksrc, p.sk_s, 0, keys, p.D, p.Dp, TKL, T(1), ws.kpanel.data());
  }
  std::fill_n(ws.dk.begin(), keys * p.Dp, GradAcc(0));
  std::fill_n(ws.dv.begin(), keys * p.Dp, GradAcc(0));
  const int64_t lut_row = tlut.present() ? c0 / tlut.row_block : 0;
  for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    const int64_t bh = b * p.H + h, slot = bh - ops.bh0;
    const T* l2 = ops.lse2 + slot * ops.Sq_pad;
    const T* dl = ops.delta + slot * ops.Sq_pad;
    const int64_t g = h - hk * p.group;
    const T slope2 = mods.slope2(b, h);
    for_each_segment(tlut, b, h, lut_row, pred.query_lo(b, c0), pred.query_hi(b, c1 - 1), p.Sq, [&](int64_t a, int64_t e) {
      for (int64_t t0 = a / NR * NR, t1; t0 < e; t0 = t1) {
        t1 = std::min(t0 + TQ, e);
        const int64_t start = std::max(a, t0), n = round_up(t1 - t0, W);  // the queries' columns, as in the forward
        if (!tile_spans(keys, start, t0, t1, [&](int64_t j) { return pred.query_lo(b, c0 + j); },
                        [&](int64_t j) { return pred.query_hi(b, c0 + j); }, ws.spans.data()))
          continue;
        if (drop.on())
          for (int64_t i = 0; i < n; ++i) ws.drop_rows[i] = drop.row_key(bh, t0 + i);
        const int64_t panel = slot * ops.Sq_pad * p.D + t0 * p.D;
        // Only keys [ja, ja + nk) see a query of this tile (as live_rows in the forward): the products skip
        // the others, whose rows of S^T / dS^T are then never read.
        const RowRange live = live_rows(ws.spans.data(), keys);
        const int64_t ja = live.first, nk = live.count;
        if (bias.present()) {  // the tile's bias, transposed once: each key's column is then one contiguous run
          alignas(64) T bias_run[ScoreBias<T>::kMaxRun];  // (a column read in place touches a line per query)
          for (int64_t i = 0; i < t1 - t0; ++i) {
            const T* row = bias.values(b, h, t0 + i, c0 + ja, false, nk, bias_run).first;
            for (int64_t j = 0; j < nk; ++j) ws.bias_t[(ja + j) * TQ + i] = row[j];
          }
        }
        if (dot) {
          if constexpr (kDotFor<S>) {
            const int64_t panel2 = slot * ops.Sq_pad * D2 + pair_column(t0, D2, ops.qt_ld);
            gemm_bf16_via(ops.brgemm, nk, n, D2, ws.k2.data() + ja * D2, D2, ops.qt2 + panel2, D2 * NR,
                          ws.s.data() + ja * TQ, TQ, false, nullptr,
                          static_cast<float>(ops.softmax_scale * kLog2e), ops.qt_ld);
            gemm_bf16_via(ops.brgemm, nk, n, D2, ws.v2.data() + ja * D2, D2, ops.dot2 + panel2, D2 * NR,
                          ws.dp.data() + ja * TQ, TQ, false, nullptr, 1.0f, ops.qt_ld);
          }
        } else {
          gemm<T>(nk, n, p.D, ws.k.data() + ja * p.D, p.D, ops.qt + panel, p.D * NR, ws.s.data() + ja * TQ,
                  TQ, false);
          gemm<T>(nk, n, p.D, ws.v.data() + ja * p.D, p.D, ops.dot_t + panel, p.D * NR,
                  ws.dp.data() + ja * TQ, TQ, false);
        }
        for (int64_t j = ja; j < ja + nk; ++j) {
          T* s = ws.s.data() + j * TQ;  // becomes P^T
          T* ds = ws.dp.data() + j * TQ;  // becomes dS^T
          if (ws.spans[j].empty()) {
            zero_row(s, n);
            zero_row(ds, n);
            continue;
          }
          // key c0 + j against query t0 + i: ALiBi's distance |i - (c0 + j - t0 - offset)|
          T* capgrad = mods.softcap() ? ws.capgrad.data() + j * TQ : nullptr;
          if (mods.on_scores())
            mods.apply(s, n, slope2, static_cast<T>(c0 + j - t0 - pred.alibi_offset_k(c0 + j)), capgrad);
          if (bias.present()) add_bias(s, ws.bias_t.data() + j * TQ, 1, t1 - t0);  // a column of bias
          mask_row(s, ws.spans[j], n);
          // d loss / d bias[i, key] is dS before the softcap's derivative (the bias is added after the cap)
          T* dbias_col = dbias ? dbias + ((b * p.H + h) * p.Sq + t0) * p.Sk + c0 + j : nullptr;
          // dropout: dv takes the dropped P Z / (1 - p), and dS = P (dP Z / (1 - p) - delta)
          if (drop.on()) drop.column(ws.drop.data(), n, ws.drop_rows.data(), c0 + j);
          // P as the forward made it: the cubic where P and dS are rounded to bf16 for their products (exp2_p)
          with_p_exp<kDotFor<S>>(dot, [&](auto bf16p) {
            for (int64_t i = 0; i < n; i += W) {
              const V pr = exp2_p<decltype(bf16p)::value, T>(vload(s + i) - vload(l2 + t0 + i));
              V dpv = vload(ds + i);
              if (drop.on()) {
                const V z = vload(ws.drop.data() + i);
                vstore(s + i, pr * z);
                dpv *= z;
              } else {
                vstore(s + i, pr);
              }
              V dsv = pr * (dpv - vload(dl + t0 + i));
              if (dbias_col)
                for (int x = 0; x < W; ++x)
                  if (i + x >= ws.spans[j].v0 && i + x < ws.spans[j].v1) dbias_col[(i + x) * p.Sk] = dsv[x];
              if (capgrad) dsv *= vload(capgrad + i);  // d softcap(s) / ds
              vstore(ds + i, dsv);
            }
          });
          zero_outside(s, ws.spans[j], n);
          zero_outside(ds, ws.spans[j], n);
        }
        const int64_t rows_at = slot * p.Dp * p.Sq + t0 * NR;
        T* partial = ws.partial.data();
        const T* s_live = ws.s.data() + ja * TQ;
        const T* ds_live = ws.dp.data() + ja * TQ;
        if (dot) {  // P and dS rounded to bf16 (FlashAttention's products in the input type), float sums
          if constexpr (kDotFor<S>) {
            const int64_t lp = TQ / 2;
            const int64_t q2 = (t1 - t0 + 1) / 2, rows2 = slot * p.Dp * Sq2 + t0 / 2 * ops.row_ld;
            for (int64_t j = ja; j < ja + nk; ++j) {
              to_bf16_pairs(ws.s.data() + j * TQ, t1 - t0, ws.p2.data() + j * lp);
              to_bf16_pairs(ws.dp.data() + j * TQ, t1 - t0, ws.ds2.data() + j * lp);
            }
            gemm_bf16_via(ops.brgemm, nk, p.Dp, q2, ws.p2.data() + ja * lp, lp, ops.dor2 + rows2, Sq2 * NR, partial,
                          p.Dp, false, nullptr, 1.0f, ops.row_ld);
            add_into(ws.dv.data() + ja * p.Dp, partial, nk * p.Dp);
            gemm_bf16_via(ops.brgemm, nk, p.Dp, q2, ws.ds2.data() + ja * lp, lp, ops.qs2 + rows2, Sq2 * NR, partial,
                          p.Dp, false, nullptr, static_cast<float>(ops.softmax_scale), ops.row_ld);
            add_into(ws.dk.data() + ja * p.Dp, partial, nk * p.Dp);
            if (fused) {  // dq[t0:t1] += dS K: dS^T's live rows [ja, je) paired along the keys from an even ja0
              const int64_t ja0 = ja & ~int64_t(1), je = ja + nk;
              auto live_row = [&](int64_t j) { return j >= ja && j < je ? ws.dp.data() + j * TQ : nullptr; };
              for (int64_t j = ja0; j < je; j += 2)
                to_bf16_pair_columns(live_row(j), live_row(j + 1), n, ws.dsq2.data() + (j - ja0) / 2 * TQ);
              GradAcc* dq_rows = dq.acc + (g * dq.rows + t0 - dq.row0) * p.Dp;
              if (ops.brgemm) {  // dq^T = K^T dS^T: brgemm has no transposed A, and dS^T's pairs are its VNNI B
                brgemm_bf16_block(p.D, t1 - t0, (je - ja0 + 1) / 2, ws.kt_rows.data(), TKL / 2, ja0,
                                  ws.dsq2.data(), TQ, partial, TQ);
                add_transposed_into(dq_rows, p.Dp, partial, TQ, t1 - t0, p.D);
              } else {
                gemm_bf16<true>(t1 - t0, p.Dp, (je - ja0 + 1) / 2, ws.dsq2.data(), TQ,
                                ws.kpair.data() + ja0 / 2 * NR, keys2 * NR, partial, p.Dp, false);
                add_into(dq_rows, partial, (t1 - t0) * p.Dp);
              }
            }
          }
          continue;
        }
        if (exact) {
          gemm_in_spans<T>(nk, ws.spans.data() + ja, p.Dp, s_live, TQ, ops.dor + rows_at, p.Sq * NR, partial,
                           p.Dp, false);
        } else {
          gemm<T>(nk, p.Dp, t1 - t0, s_live, TQ, ops.dor + rows_at, p.Sq * NR, partial, p.Dp, false);
        }
        add_into(ws.dv.data() + ja * p.Dp, partial, nk * p.Dp);
        if (exact) {
          gemm_in_spans<T>(nk, ws.spans.data() + ja, p.Dp, ds_live, TQ, ops.qs + rows_at, p.Sq * NR, partial,
                           p.Dp, false);
        } else {
          gemm<T>(nk, p.Dp, t1 - t0, ds_live, TQ, ops.qs + rows_at, p.Sq * NR, partial, p.Dp, false);
        }
        add_into(ws.dk.data() + ja * p.Dp, partial, nk * p.Dp);
        if (fused) {  // dq[t0:t1] += dS K = (dS^T)^T K
          if (exact) {  // query i sums only the keys it sees: [j0, j1) of the tile
            for (int64_t i = 0; i < t1 - t0; ++i) {
              const int64_t qi = t0 + i;
              const int64_t j0 = qi < start ? 0 : std::max(pred.key_lo(b, qi), c0) - c0;
              const int64_t j1 = qi < start ? 0 : std::min(pred.key_hi(b, qi), c1) - c0;
              if (j0 >= j1) {
                std::fill(partial + i * p.Dp, partial + (i + 1) * p.Dp, T(0));
                continue;
              }
              gemm<T, true>(1, p.Dp, j1 - j0, ws.dp.data() + j0 * TQ + i, TQ,
                            ws.kpanel.data() + j0 * NR, TKL * NR, partial + i * p.Dp, p.Dp, false);
            }
          } else {
            gemm<T, true>(t1 - t0, p.Dp, nk, ds_live, TQ, ws.kpanel.data() + ja * NR, TKL * NR, partial,
                          p.Dp, false);
          }
          add_into(dq.acc + (g * dq.rows + t0 - dq.row0) * p.Dp, partial, (t1 - t0) * p.Dp);
        }
      }
    });
  }
  for (int64_t j = 0; j < keys; ++j) {
    const int64_t row = (b * p.Sk + c0 + j) * p.Hkv + hk;
    store_row(ws.dk.data() + j * p.Dp, p.D, T(1), dkp + row * p.D);
    store_row(ws.dv.data() + j * p.Dp, p.D, T(1), dvp + row * p.D);
  }
  if (ops.brgemm) at::native::cpublas::brgemm_release();
}

// Elements (words with `dot`) of one (b, head)'s operands in alloc_head_operands' buffers (q and dO as
// transposed and as row panels, lse and delta), Sq_pad = Sq rounded up to the panel width.
inline int64_t head_operand_elems(const Problem& p, int64_t Sq_pad, bool dot) {
  if (dot) return 2 * Sq_pad * ((p.D + 1) / 2) + 2 * p.Dp * ((p.Sq + 1) / 2) + 2 * Sq_pad;
  return 2 * Sq_pad * p.D + 2 * p.Dp * p.Sq + 2 * Sq_pad;
}

// The backward's per-head operand buffers for `heads` (b, head) pairs, their padding set: (c q)^T, dO^T,
// dO and (scale q), or with `dot` their bf16-pair forms (BwdOperands), the per-row lse in base 2 and
// delta = rowsum(dO * O) - dlse.
template <typename S>
BwdOperands<compute_t<S>> alloc_head_operands(const Problem& p, const at::Tensor& q, int64_t heads, bool dot) {
  using T = compute_t<S>;
  constexpr int64_t NR = kGemmN<T>;
  BwdOperands<T> ops;
  ops.dot = dot;
  ops.brgemm = dot && bf16_brgemm();
  ops.Sq_pad = round_up(p.Sq, NR);
  ops.Sk_pad = round_up(p.Sk, NR);
  ops.qt_ld = ops.brgemm ? ops.Sq_pad : NR;
  ops.kt_ld = ops.brgemm ? ops.Sk_pad : NR;
  ops.row_ld = ops.brgemm ? p.Dp : NR;
  auto opts = q.options().dtype(c10::CppTypeToScalarType<T>::value);
  auto buffer = [&](int64_t n, bool zeroed) {
    ops.storage.push_back(zeroed ? at::zeros({n}, opts) : at::empty({n}, opts));
    return ops.storage.back().template data_ptr<T>();
  };
  if (dot) {  // every word is written by fill_head_operands (the panels' padding columns included)
    const int64_t D2 = (p.D + 1) / 2, Sq2 = (p.Sq + 1) / 2;
    ops.qt2 = ops.words(heads * ops.Sq_pad * D2, q);
    ops.dot2 = ops.words(heads * ops.Sq_pad * D2, q);
    ops.dor2 = ops.words(heads * p.Dp * Sq2, q);
    ops.qs2 = ops.words(heads * p.Dp * Sq2, q);
  } else {
    ops.qt = buffer(heads * ops.Sq_pad * p.D, false);
    ops.dot_t = buffer(heads * ops.Sq_pad * p.D, false);
    zero_padding_panels<NR>(ops.qt, heads, p.Sq, p.D);
    zero_padding_panels<NR>(ops.dot_t, heads, p.Sq, p.D);
    ops.dor = buffer(heads * p.Dp * p.Sq, false);
    ops.qs = buffer(heads * p.Dp * p.Sq, false);
  }
  ops.lse2 = buffer(heads * ops.Sq_pad, false);
  ops.delta = buffer(heads * ops.Sq_pad, true);
  std::fill(ops.lse2, ops.lse2 + heads * ops.Sq_pad, std::numeric_limits<T>::infinity());  // padding: P = 0
  return ops;
}

// Packs the (b, head) pairs [bh0, bh1) into the per-head buffers (ops.bh0 = bh0); only rows < Sq are
// written, so the padding alloc_head_operands set stays. dlse: contiguous, lse's dtype, or undefined.
template <typename S>
void fill_head_operands(BwdOperands<compute_t<S>>& ops, const Problem& p, const at::Tensor& q, const at::Tensor& out,
                        const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& dlse, double softmax_scale,
                        int64_t bh0, int64_t bh1) {
  using T = compute_t<S>;
  constexpr int64_t NR = kGemmN<T>;
  const T scale = static_cast<T>(softmax_scale);
  const T c = static_cast<T>(softmax_scale * kLog2e);
  const T inf = std::numeric_limits<T>::infinity();
  ops.bh0 = bh0;
  ops.softmax_scale = softmax_scale;
  const int64_t D2 = (p.D + 1) / 2, Sq2 = (p.Sq + 1) / 2;
  const S *qp = q.data_ptr<S>(), *op = out.data_ptr<S>(), *dop = dout.data_ptr<S>();
  const auto* lsep = lse.data_ptr<compute_t<S>>();
  const auto* dlse_p = dlse.defined() ? dlse.data_ptr<compute_t<S>>() : nullptr;
  const int64_t so_b = out.stride(0), so_s = out.stride(1), so_h = out.stride(2);
  const int64_t sd_b = dout.stride(0), sd_s = dout.stride(1), sd_h = dout.stride(2);
  constexpr int64_t kPackRows = 256;
  const int64_t qchunks = (p.Sq + kPackRows - 1) / kPackRows;
  const int64_t tasks = (bh1 - bh0) * qchunks;
  at::parallel_for(0, tasks, serial_grain(tasks, (bh1 - bh0) * p.Sq * p.D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = t / qchunks, bh = bh0 + slot, r0 = (t % qchunks) * kPackRows;
      const int64_t r1 = std::min(r0 + kPackRows, p.Sq);
      const int64_t b = bh / p.H, h = bh % p.H;
      const S* qsrc = qp + b * p.sq_b + h * p.sq_h;
      const S* dsrc = dop + b * sd_b + h * sd_h;
      if (ops.dot) {  // unscaled: the products take the scales
        if constexpr (kDotFor<S>) {
          pack_transposed_pairs<NR>(qsrc, p.sq_s, r0, r1, p.D, ops.qt2 + slot * ops.Sq_pad * D2, r1 == p.Sq,
                                    ops.qt_ld);
          pack_transposed_pairs<NR>(dsrc, sd_s, r0, r1, p.D, ops.dot2 + slot * ops.Sq_pad * D2, r1 == p.Sq,
                                    ops.qt_ld);
          pack_row_pairs<NR>(dsrc, sd_s, r0, r1, p.Sq, p.D, p.Dp, ops.dor2 + slot * p.Dp * Sq2, ops.row_ld);
          pack_row_pairs<NR>(qsrc, p.sq_s, r0, r1, p.Sq, p.D, p.Dp, ops.qs2 + slot * p.Dp * Sq2, ops.row_ld);
        }
      } else {
        pack_transposed_panels<NR>(qsrc, p.sq_s, r0, r1, p.D, c, ops.qt + slot * ops.Sq_pad * p.D);
        pack_transposed_panels<NR>(dsrc, sd_s, r0, r1, p.D, T(1), ops.dot_t + slot * ops.Sq_pad * p.D);
        pack_row_panels<NR>(dsrc, sd_s, r0, r1, p.D, p.Dp, p.Sq, T(1), ops.dor + slot * p.Dp * p.Sq);
        pack_row_panels<NR>(qsrc, p.sq_s, r0, r1, p.D, p.Dp, p.Sq, scale, ops.qs + slot * p.Dp * p.Sq);
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T l = static_cast<T>(lsep[bh * p.Sq + r]);
        // Rows that attend to nothing (lse = -inf) must give P = 0: exp2(s - inf).
        ops.lse2[slot * ops.Sq_pad + r] = l == -inf ? inf : l * static_cast<T>(kLog2e);
        // in vectors: a scalar sum is a chain of D dependent adds per row (~6 us of a 16-token call at H = 8)
        T acc = dot(op + b * so_b + r * so_s + h * so_h, dsrc + r * sd_s, p.D);
        if (dlse_p) acc -= static_cast<T>(dlse_p[bh * p.Sq + r]);
        ops.delta[slot * ops.Sq_pad + r] = acc;
      }
    }
  });
}

// dlse as fill_head_operands reads it: contiguous in lse's dtype, or undefined.
inline at::Tensor dlse_operand(const at::Tensor& lse, const c10::optional<at::Tensor>& dlse) {
  return dlse.has_value() && dlse->defined() ? dlse->to(lse.scalar_type()).contiguous() : at::Tensor();
}

// Every (b, head)'s operands; with `two_pass`, also K^T, V^T and K per (b, kv head) for the dq pass.
template <typename S>
BwdOperands<compute_t<S>> pack_backward_operands(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& dout,
                                                 const at::Tensor& lse, const c10::optional<at::Tensor>& dlse,
                                                 double softmax_scale, bool two_pass, bool dot) {
  using T = compute_t<S>;
  constexpr int64_t NR = kGemmN<T>;
  BwdOperands<T> ops = alloc_head_operands<S>(p, q, p.B * p.H, dot);
  fill_head_operands<S>(ops, p, q, out, dout, lse, dlse_operand(lse, dlse), softmax_scale, 0, p.B * p.H);
  auto opts = q.options().dtype(c10::CppTypeToScalarType<T>::value);
  auto buffer = [&](int64_t n) {
    ops.storage.push_back(at::empty({n}, opts));
    return ops.storage.back().template data_ptr<T>();
  };
  if (!two_pass) return ops;

  const S *kp = k.data_ptr<S>(), *vp = v.data_ptr<S>();
  constexpr int64_t kPackKeys = 256;
  const int64_t kchunks = (p.Sk + kPackKeys - 1) / kPackKeys;
  if (dot) {
    if constexpr (kDotFor<S>) {
      const int64_t D2 = (p.D + 1) / 2, Sk2 = (p.Sk + 1) / 2;
      ops.kt2 = ops.words(p.B * p.Hkv * ops.Sk_pad * D2, q);
      ops.vt2 = ops.words(p.B * p.Hkv * ops.Sk_pad * D2, q);
      ops.kr2 = ops.words(p.B * p.Hkv * p.Dp * Sk2, q);
      at::parallel_for(0, p.B * p.Hkv * kchunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t bh = t / kchunks, r0 = (t % kchunks) * kPackKeys, r1 = std::min(r0 + kPackKeys, p.Sk);
          const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
          const S* ksrc = kp + b * p.sk_b + hk * p.sk_h;
          pack_transposed_pairs<NR>(ksrc, p.sk_s, r0, r1, p.D, ops.kt2 + bh * ops.Sk_pad * D2, r1 == p.Sk,
                                    ops.kt_ld);
          pack_transposed_pairs<NR>(vp + b * p.sv_b + hk * p.sv_h, p.sv_s, r0, r1, p.D, ops.vt2 + bh * ops.Sk_pad * D2,
                                    r1 == p.Sk, ops.kt_ld);
          pack_row_pairs<NR>(ksrc, p.sk_s, r0, r1, p.Sk, p.D, p.Dp, ops.kr2 + bh * p.Dp * Sk2, ops.row_ld);
        }
      });
    }
    return ops;
  }
  ops.kt = buffer(p.B * p.Hkv * ops.Sk_pad * p.D);
  ops.vt = buffer(p.B * p.Hkv * ops.Sk_pad * p.D);
  zero_padding_panels<NR>(ops.kt, p.B * p.Hkv, p.Sk, p.D);
  zero_padding_panels<NR>(ops.vt, p.B * p.Hkv, p.Sk, p.D);
  ops.kr = buffer(p.B * p.Hkv * p.Dp * p.Sk);
  at::parallel_for(0, p.B * p.Hkv * kchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / kchunks, r0 = (t % kchunks) * kPackKeys, r1 = std::min(r0 + kPackKeys, p.Sk);
      const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
      const S* ksrc = kp + b * p.sk_b + hk * p.sk_h;
      pack_transposed_panels<NR>(ksrc, p.sk_s, r0, r1, p.D, T(1), ops.kt + bh * ops.Sk_pad * p.D);
      pack_transposed_panels<NR>(vp + b * p.sv_b + hk * p.sv_h, p.sv_s, r0, r1, p.D, T(1),
                                 ops.vt + bh * ops.Sk_pad * p.D);
      pack_row_panels<NR>(ksrc, p.sk_s, r0, r1, p.D, p.Dp, p.Sk, T(1), ops.kr + bh * p.Dp * p.Sk);
    }
  });
  return ops;
}

// The two-pass backward's dq of the query rows [r0, r1) of head h: per key tile of their LUT row,
// S = Q K^T and dP = dO V^T again, dS = P (dP - delta), dq += dS K.
template <typename S, typename T>
void query_tile_dq(const Problem& p, const BwdOperands<T>& ops, const BlockLut& lut, const Predicates& pred,
                   const ScoreMods<T>& mods, const ScoreBias<T>& bias, const Dropout& drop, const S* qp,
                   const at::Tensor& dout, int64_t b, int64_t h, int64_t r0, int64_t r1, double softmax_scale,
                   bool exact, DqScratch<T>& ws, S* dqp) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  constexpr int64_t NR = kGemmN<T>;
  const T c = static_cast<T>(softmax_scale * kLog2e);
  const int64_t rows = r1 - r0, hk = h / p.group, bh = b * p.H + h, bhk = b * p.Hkv + hk;
  const S* dop = dout.data_ptr<S>();
  const int64_t sd_b = dout.stride(0), sd_s = dout.stride(1), sd_h = dout.stride(2);
  const bool dot = ops.dot;  // bf16 products: q and dO as they are (c multiplies the float scores)
  const int64_t D2 = (p.D + 1) / 2, Sk2 = (p.Sk + 1) / 2;
  if (dot) {
    if constexpr (kDotFor<S>) {
      pack_transposed_pairs<1>(qp + b * p.sq_b + h * p.sq_h + r0 * p.sq_s, p.sq_s, 0, rows, p.D, ws.q2.data());
      pack_transposed_pairs<1>(dop + b * sd_b + h * sd_h + r0 * sd_s, sd_s, 0, rows, p.D, ws.dout2.data());
    }
  } else {
    pack_rows(qp + b * p.sq_b + h * p.sq_h + r0 * p.sq_s, p.sq_s, 0, rows, p.D, c, ws.q.data(), p.D);
    pack_rows(dop + b * sd_b + h * sd_h + r0 * sd_s, sd_s, 0, rows, p.D, T(1), ws.dout.data(), p.D);
  }
  std::fill(ws.acc.begin(), ws.acc.end(), GradAcc(0));
  const T* l2 = ops.lse2 + (bh - ops.bh0) * ops.Sq_pad + r0;
  const T* dl = ops.delta + (bh - ops.bh0) * ops.Sq_pad + r0;
  const T slope2 = mods.slope2(b, h);
  for_each_key_tile<T>(lut, pred, b, h, r0, r1, p.Sk, ws.spans.data(), [&](int64_t t0, int64_t t1, int64_t n) {
    const int64_t panel = bhk * ops.Sk_pad * p.D + t0 * p.D;
    const RowRange live = live_rows(ws.spans.data(), rows);  // as in the forward: only rows that see the tile
    const int64_t ra = live.first, nr = live.count;
    if (dot) {
      if constexpr (kDotFor<S>) {
        const int64_t panel2 = bhk * ops.Sk_pad * D2 + pair_column(t0, D2, ops.kt_ld);
        gemm_bf16_via(ops.brgemm, nr, n, D2, ws.q2.data() + ra * D2, D2, ops.kt2 + panel2, D2 * NR,
                      ws.s.data() + ra * kTileK, kTileK, false, nullptr, static_cast<float>(c), ops.kt_ld);
        gemm_bf16_via(ops.brgemm, nr, n, D2, ws.dout2.data() + ra * D2, D2, ops.vt2 + panel2, D2 * NR,
                      ws.dp.data() + ra * kTileK, kTileK, false, nullptr, 1.0f, ops.kt_ld);
      }
    } else {
      gemm<T>(nr, n, p.D, ws.q.data() + ra * p.D, p.D, ops.kt + panel, p.D * NR, ws.s.data() + ra * kTileK, kTileK,
              false);
      gemm<T>(nr, n, p.D, ws.dout.data() + ra * p.D, p.D, ops.vt + panel, p.D * NR, ws.dp.data() + ra * kTileK,
              kTileK, false);
    }
    for (int64_t r = ra; r < ra + nr; ++r) {
      T* s = ws.s.data() + r * kTileK;  // becomes dS
      if (ws.spans[r].empty()) {
        zero_row(s, n);
        continue;
      }
      T* capgrad = mods.softcap() ? ws.capgrad.data() + r * kTileK : nullptr;
      if (mods.on_scores())
        mods.apply(s, n, slope2, static_cast<T>(r0 + r + pred.alibi_offset_q(r0 + r) - t0), capgrad);
      if (bias.present()) {
        alignas(64) T bias_run[ScoreBias<T>::kMaxRun];
        add_bias(s, bias.values(b, h, r0 + r, t0, false, t1 - t0, bias_run).first, 1, t1 - t0);
      }
      mask_row(s, ws.spans[r], n);
      const T* dpr = ws.dp.data() + r * kTileK;
      const V lv = vsplat(l2[r]), dlv = vsplat(dl[r]);
      if (drop.on()) drop.row(ws.drop.data(), n, drop.row_key(bh, r0 + r), t0);
      with_p_exp<kDotFor<S>>(dot, [&](auto bf16p) {  // P as in the dk / dv pass
        for (int64_t j = 0; j < n; j += W) {
          const V pr = exp2_p<decltype(bf16p)::value, T>(vload(s + j) - lv);
          V dpv = vload(dpr + j);
          if (drop.on()) dpv *= vload(ws.drop.data() + j);  // dS = P (dP Z / (1 - p) - delta)
          V dsv = pr * (dpv - dlv);
          if (capgrad) dsv *= vload(capgrad + j);
          vstore(s + j, dsv);
        }
      });
      zero_outside(s, ws.spans[r], n);
    }
    T* partial = ws.partial.data() + ra * p.Dp;
    if (dot) {  // dS rounded to bf16 pairs along the keys
      if constexpr (kDotFor<S>) {
        for (int64_t r = ra; r < ra + nr; ++r)
          to_bf16_pairs(ws.s.data() + r * kTileK, t1 - t0, ws.ds2.data() + r * (kTileK / 2));
        gemm_bf16_via(ops.brgemm, nr, p.Dp, (t1 - t0 + 1) / 2, ws.ds2.data() + ra * (kTileK / 2), kTileK / 2,
                      ops.kr2 + bhk * p.Dp * Sk2 + t0 / 2 * ops.row_ld, Sk2 * NR, partial, p.Dp, false, nullptr, 1.0f,
                      ops.row_ld);
      }
      add_into(ws.acc.data() + ra * p.Dp, partial, nr * p.Dp);
      return;
    }
    const T* kpanel = ops.kr + bhk * p.Dp * p.Sk + t0 * NR;
    if (exact)
      gemm_in_spans<T>(nr, ws.spans.data() + ra, p.Dp, ws.s.data() + ra * kTileK, kTileK, kpanel, p.Sk * NR, partial,
                       p.Dp, false);
    else
      gemm<T>(nr, p.Dp, t1 - t0, ws.s.data() + ra * kTileK, kTileK, kpanel, p.Sk * NR, partial, p.Dp, false);
    add_into(ws.acc.data() + ra * p.Dp, partial, nr * p.Dp);
  });
  for (int64_t r = 0; r < rows; ++r)
    store_row(ws.acc.data() + r * p.Dp, p.D, static_cast<T>(softmax_scale),
              dqp + ((b * p.Sq + r0 + r) * p.H + h) * p.D);
  if (ops.brgemm) at::native::cpublas::brgemm_release();
}

template <typename S>
void backward_kernel(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const BlockLut& lut, const BlockLut& tlut, const Predicates& pred, double softmax_scale,
                     const ScoreMods<compute_t<S>>& mods, const ScoreBias<compute_t<S>>& bias, const Dropout& drop,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
  using T = compute_t<S>;
  const Problem p = make_problem(q, k, v, kGemmN<T>);

  // NaN / Inf in q, k or dO: every product runs over each row's own span (gemm_in_spans). Finite
  // inputs, the normal case, keep the tile GEMMs; the check is a pass over O(S * D) elements.
  const bool exact = !(finite_rows<S>(q) && finite_rows<S>(k) && finite_rows<S>(dout));
  // bf16 products (cpu/gemm_bf16.h) in every form (the key tiles' five products, the two-pass form's dq pass); the
  // exact path stays float (its per-span products are the float GEMM's).
  const bool dot = kDotFor<S> && bf16_dot() && !exact;
  // Fused single pass: a task per (b, kv head) owns its group's dq rows, 5 block products per tile
  // pair. When B * Hkv tasks cannot keep the threads busy (MQA, small batches, many threads), each
  // (b, kv head) splits its key tiles into `chunks` runs of equal cost, each task with a dq accumulator
  // of the rows its keys reach, summed in chunk order afterwards. Two passes (dq, then dk/dv): 7
  // products, no accumulator, any number of tasks: for a deterministic schedule (results independent of
  // the thread count, which the chunks are not) and when the chunks' accumulators would be too large.
  const int64_t threads = at::get_num_threads();
  const int mode = backward_mode();
  const int64_t pairs = p.B * p.Hkv;
  const BwdTiles tiles = backward_tiles(pred, p.Sk);
  const int64_t TK = tile_rows(tlut, tiles.keys);
  const int64_t k_tiles = (p.Sk + TK - 1) / TK;
  const int64_t tile_keys = std::min(TK, p.Sk);  // the most keys a tile has (KeyTileScratch)
  // multiply-adds per unit of a fused task's cost (a query of a key tile): five products over the tile's keys. Small
  // calls stay on the calling thread (run_tasks)
  const int64_t key_tile_work = TK * p.D * 5;
  bool fused = mode == 1 || mode == 3 || (mode == 0 && !deterministic_schedule());
  int64_t chunks = 1;
  if (mode == 3) {
    chunks = 3;  // test aid: a split whatever the thread count
  } else if (fused && pairs < 2 * threads && pairs % threads != 0) {
    while (pairs * chunks < 2 * threads && (pairs * chunks) % threads != 0) ++chunks;
  }
  chunks = std::max<int64_t>(1, std::min(chunks, k_tiles));
  auto tile_queries = [&](int64_t b, int64_t hk, int64_t c0, int64_t c1) {
    int64_t queries = 0;
    for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h)
      for_each_segment(tlut, b, h, tlut.present() ? c0 / tlut.row_block : 0, pred.query_lo(b, c0),
                       pred.query_hi(b, c1 - 1), p.Sq, [&](int64_t a, int64_t e) { queries += e - a; });
    return queries;
  };
  // per (b, kv head, chunk) i: its key tiles [first[i], last[i]), its dq rows [row0[i], row1[i]) and their offset
  // in the accumulators
  std::vector<int64_t> first, last, costs, row0, row1, offset;
  if (fused && chunks > 1) {
    constexpr int64_t NR = kGemmN<T>;
    first.resize(pairs * chunks);
    last.resize(pairs * chunks);
    row0.resize(pairs * chunks);
    row1.resize(pairs * chunks);
    offset.resize(pairs * chunks + 1);
    costs.resize(pairs * chunks);
    std::vector<int64_t> tile_cost(k_tiles);
    offset[0] = 0;
    for (int64_t t = 0; t < pairs; ++t) {
      const int64_t b = t / p.Hkv, hk = t % p.Hkv;
      int64_t total = 0;
      for (int64_t kt = 0; kt < k_tiles; ++kt)
        total += tile_cost[kt] = tile_queries(b, hk, kt * TK, std::min((kt + 1) * TK, p.Sk));
      // chunk c ends at the first tile where the running cost reaches (c + 1) / chunks of the total
      int64_t kt = 0, run = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = t * chunks + c;
        first[i] = kt;
        const int64_t goal = c + 1 == chunks ? total : (total * (c + 1) + chunks - 1) / chunks;
        int64_t cost = 0;
        while (kt < k_tiles && (run < goal || c + 1 == chunks)) {
          run += tile_cost[kt];
          cost += tile_cost[kt++];
        }
        costs[i] = cost;
        last[i] = kt;
        const int64_t c0 = first[i] * TK, c1 = std::min(kt * TK, p.Sk);
        row0[i] = row1[i] = 0;
        if (c0 < c1) {
          row1[i] = std::min(pred.query_hi(b, c1 - 1), p.Sq);
          row0[i] = std::min(pred.query_lo(b, c0) / NR * NR, row1[i]);
        }
        offset[i + 1] = offset[i] + p.group * (row1[i] - row0[i]) * p.Dp;
      }
    }
    // the accumulators against the unsplit form's, a (group, Sq, Dp) one per busy thread: beyond 256 MiB and
    // twice that, two passes (no accumulator) instead
    const int64_t bytes = offset.back() * int64_t(sizeof(GradAcc));
    const int64_t unsplit = std::min(threads, pairs) * p.group * p.Sq * p.Dp * int64_t(sizeof(GradAcc));
    if (mode == 0 && bytes > std::max<int64_t>(int64_t(256) << 20, 2 * unsplit)) fused = false;
  }
  // the unsplit fused pass packs its operands in waves (below); the other forms read every head's
  const bool waves = fused && chunks == 1;
  const BwdOperands<T> ops =
      waves ? BwdOperands<T>{} : pack_backward_operands<S>(p, q, k, v, out, dout, lse, dlse, softmax_scale, !fused, dot);

  const S *qp = q.data_ptr<S>(), *kp = k.data_ptr<S>(), *vp = v.data_ptr<S>();
  S* dqp = dq.data_ptr<S>();
  S* dkp = dk.data_ptr<S>();
  S* dvp = dv.data_ptr<S>();
  T* dbp = dbias.numel() > 0 ? dbias.data_ptr<T>() : nullptr;  // (B, H, Sq, Sk), zeros where no pair is visited
  const T scale = static_cast<T>(softmax_scale);

  if (waves) {
    // Waves of (b, kv head) pairs, as in the forward: each wave packs its heads' operands into one buffer that
    // the next reuses, instead of every head's at once (at 32K, H = 8, D = 64: 268 MB mapped and faulted in
    // afresh on every call). At least 2 pairs a thread a wave, so that the costliest-first order still has
    // tasks to balance; a task computes what it computes in one wave, bit for bit.
    const int64_t Sq_pad = round_up(p.Sq, kGemmN<T>);
    const int64_t pair_bytes = p.group * head_operand_elems(p, Sq_pad, dot) * int64_t(sizeof(T));
    const int64_t wave = even_waves(
        pairs, std::max<int64_t>(2 * threads, forward_wave_bytes() / std::max<int64_t>(pair_bytes, 1)), threads);
    BwdOperands<T> wops = alloc_head_operands<S>(p, q, wave * p.group, dot);
    const at::Tensor dlse_c = dlse_operand(lse, dlse);
    for (int64_t g0 = 0; g0 < pairs; g0 += wave) {
      const int64_t g1 = std::min(g0 + wave, pairs);
      fill_head_operands<S>(wops, p, q, out, dout, lse, dlse_c, softmax_scale, g0 * p.group, g1 * p.group);
      run_tasks(
          g1 - g0,
          [&](int64_t t) {
            int64_t queries = 0;
            for (int64_t kt = 0; kt < k_tiles; ++kt)
              queries += tile_queries((g0 + t) / p.Hkv, (g0 + t) % p.Hkv, kt * TK, std::min((kt + 1) * TK, p.Sk));
            return queries;
          },
          [&] {
            return KeyTileScratch<T>(p.D, p.Dp, tiles, tile_keys, p.group * p.Sq, mods.softcap(), bias.present(), dot);
          },
          [&](int64_t t, KeyTileScratch<T>& ws) {
            const int64_t b = (g0 + t) / p.Hkv, hk = (g0 + t) % p.Hkv;
            std::fill(ws.dq.begin(), ws.dq.end(), GradAcc(0));
            const DqRows rows{ws.dq.data(), 0, p.Sq};
            for (int64_t kt = 0; kt < k_tiles; ++kt)
              key_tile_backward(p, wops, tlut, pred, mods, bias, drop, dbp, kp, vp, b, hk, kt * TK,
                                std::min((kt + 1) * TK, p.Sk), rows, exact, ws, dkp, dvp);
            for (int64_t g = 0; g < p.group; ++g)
              for (int64_t r = 0; r < p.Sq; ++r)
                store_row(ws.dq.data() + (g * p.Sq + r) * p.Dp, p.D, scale,
                          dqp + ((b * p.Sq + r) * p.H + hk * p.group + g) * p.D);
          },
          key_tile_work);
    }
    return;
  }
  if (fused) {
    // uninitialised: each task zeroes its own rows (first touched by the thread that sums into them)
    const at::Tensor acc_storage = at::empty({std::max<int64_t>(offset.back(), 1)}, q.options().dtype(at::kDouble));
    GradAcc* acc = acc_storage.data_ptr<GradAcc>();
    run_tasks(
        pairs * chunks, [&](int64_t i) { return costs[i]; },
        [&] { return KeyTileScratch<T>(p.D, p.Dp, tiles, tile_keys, 0, mods.softcap(), bias.present(), dot); },
        [&](int64_t i, KeyTileScratch<T>& ws) {
          const int64_t b = i / chunks / p.Hkv, hk = i / chunks % p.Hkv;
          std::fill(acc + offset[i], acc + offset[i + 1], GradAcc(0));
          const DqRows rows{acc + offset[i], row0[i], row1[i] - row0[i]};
          for (int64_t kt = first[i]; kt < last[i]; ++kt)
            key_tile_backward(p, ops, tlut, pred, mods, bias, drop, dbp, kp, vp, b, hk, kt * TK,
                              std::min((kt + 1) * TK, p.Sk), rows, exact, ws, dkp, dvp);
        },
        key_tile_work);
    // dq row = the chunks' partials that hold it, summed in chunk order (rows no key reaches: zeros)
    const int64_t row_blocks = (p.Sq + kTileQ - 1) / kTileQ;
    const int64_t sums = pairs * p.group * row_blocks;
    const int64_t grain = serial_grain(sums, chunks * pairs * p.group * p.Sq * p.D);
    at::parallel_for(0, sums, grain, [&](int64_t begin, int64_t end) {
      std::vector<GradAcc> sum(p.Dp);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t t = w / (p.group * row_blocks), g = w / row_blocks % p.group, rb = w % row_blocks;
        const int64_t b = t / p.Hkv, hk = t % p.Hkv;
        for (int64_t r = rb * kTileQ; r < std::min((rb + 1) * kTileQ, p.Sq); ++r) {
          std::fill(sum.begin(), sum.end(), GradAcc(0));
          for (int64_t i = t * chunks; i < (t + 1) * chunks; ++i)
            if (r >= row0[i] && r < row1[i]) {
              const GradAcc* part = acc + offset[i] + (g * (row1[i] - row0[i]) + r - row0[i]) * p.Dp;
              for (int64_t d = 0; d < p.Dp; ++d) sum[d] += part[d];
            }
          store_row(sum.data(), p.D, scale, dqp + ((b * p.Sq + r) * p.H + hk * p.group + g) * p.D);
        }
      }
    });
    return;
  }

  // ---- two passes: dq per (b, head, query tile), then dk/dv per (b, kv head, key tile) ----
  const int64_t TQ = tile_rows(lut, kTileQ);
  const int64_t q_tiles = (p.Sq + TQ - 1) / TQ;
  auto q_task = [&](int64_t t, int64_t& b, int64_t& h, int64_t& r0, int64_t& r1) {
    b = t / (p.H * q_tiles);
    h = (t / q_tiles) % p.H;
    r0 = (t % q_tiles) * TQ;
    r1 = std::min(r0 + TQ, p.Sq);
  };
  run_tasks(
      p.B * p.H * q_tiles,
      [&](int64_t t) {
        int64_t b, h, r0, r1, keys = 0;
        q_task(t, b, h, r0, r1);
        for_each_segment(lut, b, h, lut.present() ? r0 / lut.row_block : 0, pred.key_lo(b, r0), pred.key_hi(b, r1 - 1),
                         p.Sk, [&](int64_t a, int64_t e) { keys += e - a; });
        return keys;
      },
      [&] { return DqScratch<T>(std::min(TQ, p.Sq), p.D, p.Dp, mods.softcap(), dot); },
      [&](int64_t t, DqScratch<T>& ws) {
        int64_t b, h, r0, r1;
        q_task(t, b, h, r0, r1);
        query_tile_dq(p, ops, lut, pred, mods, bias, drop, qp, dout, b, h, r0, r1, softmax_scale, exact, ws, dqp);
      },
      TQ * p.D * 3);  // per key: S, dP and dS K over the tile's rows
  run_tasks(
      p.B * p.Hkv * k_tiles,
      [&](int64_t t) {
        const int64_t b = t / (p.Hkv * k_tiles), hk = (t / k_tiles) % p.Hkv, c0 = (t % k_tiles) * TK;
        return tile_queries(b, hk, c0, std::min(c0 + TK, p.Sk));
      },
      [&] { return KeyTileScratch<T>(p.D, p.Dp, tiles, tile_keys, 0, mods.softcap(), bias.present(), dot); },
      [&](int64_t t, KeyTileScratch<T>& ws) {
        const int64_t b = t / (p.Hkv * k_tiles), hk = (t / k_tiles) % p.Hkv, c0 = (t % k_tiles) * TK;
        key_tile_backward(p, ops, tlut, pred, mods, bias, drop, dbp, kp, vp, b, hk, c0, std::min(c0 + TK, p.Sk),
                          DqRows{}, exact, ws, dkp, dvp);
      },
      TK * p.D * 4);
}

// ------------------------------------------------------------------------------------------
// Operator entry points
// ------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& kv_num_blocks, const c10::optional<at::Tensor>& kv_indices,
    const c10::optional<at::Tensor>& q_num_blocks, const c10::optional<at::Tensor>& q_indices, int64_t block_q,
    int64_t block_k, double softmax_scale, bool causal, int64_t window_left, int64_t window_right, int64_t map_rows,
    int64_t map_cols, bool map_max, double softcap, const c10::optional<at::Tensor>& alibi_slopes,
    const c10::optional<at::Tensor>& sinks, const c10::optional<at::Tensor>& attn_bias, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, const c10::optional<at::Tensor>& key_bounds,
    const c10::optional<at::Tensor>& query_bounds, const c10::optional<at::Tensor>& alibi_offsets, bool return_max) {
  constexpr const char* op = "block_sparse_attn_fwd";
  check_core_args(op, q_in, k_in, v_in, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                  softmax_scale, window_left, window_right, false);
  check_score_mod_args(op, q_in, softcap, alibi_slopes, sinks);
  check_attn_bias_arg(op, q_in, k_in, attn_bias);
  check_dropout_args(op, q_in, dropout_p, dropout_seed);
  check_segment_bounds(op, q_in, k_in, key_bounds, query_bounds, false);
  check_alibi_offsets(op, q_in, alibi_slopes, alibi_offsets, key_bounds, query_bounds, false);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const BlockLut lut(kv_num_blocks, kv_indices, block_q, block_k);
  Predicates pred(q.size(1), k.size(1), causal, window_left, window_right);
  pred.set_bounds(key_bounds, c10::nullopt);
  pred.set_alibi_offsets(alibi_offsets);
  const MapSpec map{map_rows, map_cols, map_max};
  const Dropout drop(dropout_p, dropout_seed);
  TORCH_CHECK(map_rows >= 0 && map_cols >= 0 && (map_rows > 0) == (map_cols > 0), op,
              ": map_rows and map_cols must both be > 0 (a block map) or both 0, got (", map_rows, ", ", map_cols, ")");
  if (map.on()) {
    TORCH_CHECK(tile_rows(lut, kTileQ) % map_rows == 0, op, ": block map: map_rows (", map_rows,
                ") must divide the query tile (", tile_rows(lut, kTileQ), ")");
  }
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = empty_output(q.sizes(), q.options());
  at::Tensor lse = empty_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype));
  at::Tensor map_part = map.on() ? empty_output({q.size(0), q.size(2), (q.size(1) + map_rows - 1) / map_rows,
                                                (k.size(1) + map_cols - 1) / map_cols},
                                               q.options().dtype(lse_dtype))
                                 : at::empty({0}, q.options().dtype(lse_dtype));
  // each row's largest score (the one the softmax subtracts), when asked for
  at::Tensor max_scores = return_max ? empty_output(lse.sizes(), lse.options()) : at::empty({0}, lse.options());
  if (q.numel() == 0) return {out, lse, map_part, max_scores};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attn_fwd_cpu", [&] {
    const ScoreMods<compute_t<scalar_t>> mods(softcap, alibi_slopes, sinks, q.size(2));
    const ScoreBias<compute_t<scalar_t>> bias(attn_bias);
    forward_kernel<scalar_t>(q, k, v, lut, pred, softmax_scale, mods, bias, drop, map, out, lse, map_part,
                             max_scores);
  });
  return {out, lse, map_part, max_scores};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd_cpu(
    const at::Tensor& dout_in, const c10::optional<at::Tensor>& dlse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& kv_num_blocks, const c10::optional<at::Tensor>& kv_indices,
    const c10::optional<at::Tensor>& q_num_blocks, const c10::optional<at::Tensor>& q_indices, int64_t block_q,
    int64_t block_k, double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& attn_bias, bool bias_grad,
    double dropout_p, const c10::optional<at::Tensor>& dropout_seed, const c10::optional<at::Tensor>& key_bounds,
    const c10::optional<at::Tensor>& query_bounds, const c10::optional<at::Tensor>& alibi_offsets) {
  constexpr const char* op = "block_sparse_attn_bwd";
  check_core_args(op, q_in, k_in, v_in, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                  softmax_scale, window_left, window_right, true);
  check_score_mod_args(op, q_in, softcap, alibi_slopes, c10::nullopt);
  check_attn_bias_arg(op, q_in, k_in, attn_bias);
  check_dropout_args(op, q_in, dropout_p, dropout_seed);
  check_segment_bounds(op, q_in, k_in, key_bounds, query_bounds, true);
  check_alibi_offsets(op, q_in, alibi_slopes, alibi_offsets, key_bounds, query_bounds, true);
  const Dropout drop(dropout_p, dropout_seed);
  const bool has_bias = attn_bias.has_value() && attn_bias->defined();
  TORCH_CHECK(has_bias || !bias_grad, op, ": bias_grad without an attn_bias");
  TORCH_CHECK(!bias_grad || attn_bias->scalar_type() != at::kBool, op, ": a bool attn_bias (a mask) has no gradient");
  const bool has_lut = kv_num_blocks.has_value() && kv_num_blocks->defined();
  const bool has_tlut = q_num_blocks.has_value() && q_num_blocks->defined();
  TORCH_CHECK(has_lut == has_tlut, op, ": the backward needs both the block LUT and its transpose");
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op, ": dout ", dout_in.sizes(),
              " and out ", out_in.sizes(), " must have q's shape ", q_in.sizes());
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type(), op, ": out must have q's dtype");
  TORCH_CHECK(at::isFloatingType(dout_in.scalar_type()), op, ": dout must be floating point");
  const auto lse_type = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> lse_shape{q_in.size(0), q_in.size(2), q_in.size(1)};
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_shape) && lse_in.scalar_type() == lse_type, op, ": lse must be ",
              at::IntArrayRef(lse_shape), " in ", lse_type, ", got ", lse_in.sizes(), " in ", lse_in.scalar_type());
  if (dlse.has_value() && dlse->defined())
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(lse_shape) && at::isFloatingType(dlse->scalar_type()), op,
                ": dlse must be a floating ", at::IntArrayRef(lse_shape), " tensor, got ", dlse->sizes());
  const std::vector<at::Tensor> devs{dout_in, out_in, lse_in};
  for (const auto& t : devs) TORCH_CHECK(t.device() == q_in.device(), op, ": every tensor must be on q's device");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  // The gradient of .sum() arrives expanded with stride 0: make it (and out) dense.
  const at::Tensor dout = last_dim_contiguous(dout_in.to(q.scalar_type()));
  const at::Tensor out = last_dim_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const BlockLut lut(kv_num_blocks, kv_indices, block_q, block_k);
  const BlockLut tlut(q_num_blocks, q_indices, block_k, block_q);
  Predicates pred(q.size(1), k.size(1), causal, window_left, window_right);
  pred.set_bounds(key_bounds, query_bounds);
  pred.set_alibi_offsets(alibi_offsets);
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  // d attn_bias before the reduction over its broadcast dims (Python): (B, H, Sq, Sk) in lse's dtype,
  // zeros at the pairs the masks skip
  at::Tensor dbias = bias_grad ? at::zeros({q.size(0), q.size(2), q.size(1), k.size(1)}, q.options().dtype(lse_type))
                               : at::empty({0}, q.options().dtype(lse_type));
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dbias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attn_bwd_cpu", [&] {
    const ScoreMods<compute_t<scalar_t>> mods(softcap, alibi_slopes, c10::nullopt, q.size(2));
    const ScoreBias<compute_t<scalar_t>> bias(attn_bias);
    backward_kernel<scalar_t>(dout, dlse, q, k, v, out, lse, lut, tlut, pred, softmax_scale, mods, bias, drop, dq, dk,
                              dv, dbias);
  });
  return {dq, dk, dv, dbias};
}

}  // namespace


}  // namespace attnops::cpu::ATTNOPS_ISA
