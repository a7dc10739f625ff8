// Split-KV ("flash-decoding") attention of a few new queries against a KV cache, on the CPU.
//
// One task per (batch, split of the cache length) over every head: each K/V element is read from
// memory once for all the query heads of its group, and the (B, S, Hkv, D) cache front to back (a
// task per (batch, kv head) read key rows 16 KB apart at Hkv = 32 and reached 17% of the copy
// bandwidth). Tasks write a partial output and lse per row; a combine step merges them by lse. Causal within the new tokens: new query i of sequence b sits at position
// seqlen_b - Sq_new + i and sees keys [pos - left, pos] of the cache (left: optional window).
// An optional per-(batch, head) bitmap of kept key blocks (from a BlockMask) restricts the keys.
//
// Decode is memory-bound, so the kernel keeps the bytes read minimal and picks its inner loop by
// the rows per kv group: with few (MHA: 1) it streams every key row once and dots it with the rows
// in registers (no packing); with many (MQA/GQA groups, multi-token steps) it packs key tiles into
// GEMM panels in L1 and uses the micro-kernel, which amortises the packing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/pack.h"
#include "cpu/rows.h"
#include "cpu/parallel.h"
#include "cpu/softmax.h"
#include "ops.h"

namespace attnops::cpu {
namespace {

constexpr int64_t kTileKeys = 64;
constexpr int64_t kMaxTile = 256;
constexpr int64_t kDotPathRows = 4;  // up to this many rows per task: stream keys, no packing
constexpr int64_t kMinSplitKeys = 512;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Kept key blocks per (batch, head, query block): a dense uint8 (Bm, Hm, Nq, Nk) bitmap, B/H
// broadcast when 1. Decode has one or two query blocks, so a bitmap beats searching a LUT per tile.
struct BlockKeep {
  const uint8_t* data = nullptr;
  int64_t B = 1, H = 1, Nq = 0, Nk = 0, block_q = 1, block_k = 1;
  bool present() const { return data != nullptr; }
  bool kept(int64_t b, int64_t h, int64_t qrow, int64_t kb) const {
    return data[(((B == 1 ? 0 : b) * H + (H == 1 ? 0 : h)) * Nq + qrow) * Nk + kb] != 0;
  }
};

template <typename T>
struct DecodeScratch {
  std::vector<T> q, s, acc, m, l, alpha, kpanel, vpanel, row, row2;
  std::vector<RowSpan> spans;
  // block map: per (row, map block of the split) the sum (or max) of P and the running max it is
  // relative to (a block can span tiles between which the max grows)
  std::vector<T> map_val, map_ref;
  DecodeScratch(int64_t rows, int64_t Dp, int64_t tile, int64_t map_blocks)
      : q(rows * Dp), s(rows * tile), acc(rows * Dp), m(rows), l(rows), alpha(rows), kpanel(tile * Dp),
        vpanel(tile * Dp), row(Dp), row2(Dp), spans(rows), map_val(rows * map_blocks), map_ref(rows * map_blocks) {}
};

// Adds a tile row's probabilities (relative to the running max m) to the row's map blocks: blocks
// [t0 / bk - first, ...) of the split. A block's earlier sum is rescaled when m has grown since.
template <typename T>
inline void accumulate_map_row(const T* p, RowSpan span, int64_t t0, int64_t bk, int64_t first, T m, bool use_max,
                               T* val, T* ref) {
  if (span.empty()) return;
  for (int64_t j = span.v0; j < span.v1;) {
    const int64_t blk = (t0 + j) / bk, end = std::min(span.v1, (blk + 1) * bk - t0);
    T part = T(0);
    for (int64_t x = j; x < end; ++x) part = use_max ? std::max(part, p[x]) : part + p[x];
    if (p[j] != p[j]) part = p[j];  // NaN reaches the map
    T& v = val[blk - first];
    T& r = ref[blk - first];
    if (r != m) {  // first visit (ref = -inf) or the max grew: v relative to m
      v = r == -std::numeric_limits<T>::infinity() ? T(0) : v * exp2_scalar(r - m);
      r = m;
    }
    v = use_max ? std::max(v, part) : v + part;
    j = end;
  }
}

// (q . k0, q . k1) for two keys at once: each q vector is loaded once for both (the multi-row path
// is bound by reloading the query rows once per key).
template <typename T>
inline void dot2(const T* q, const T* k0, const T* k1, int64_t D, T& s0, T& s1) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V a0{}, a1{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V qv = vload(q + d);
    a0 += qv * vload(k0 + d);
    a1 += qv * vload(k1 + d);
  }
  s0 = hsum<T>(a0);
  s1 = hsum<T>(a1);
  for (; d < D; ++d) {
    s0 += q[d] * k0[d];
    s1 += q[d] * k1[d];
  }
}

// acc[0:D] += p0 * v0[0:D] + p1 * v1[0:D]: one read-modify-write of acc for two keys.
template <typename T>
inline void axpy2(T p0, const T* v0, T p1, const T* v1, T* acc, int64_t D) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const V a = vsplat(p0), b = vsplat(p1);
  int64_t d = 0;
  for (; d + W <= D; d += W) vstore(acc + d, vload(acc + d) + a * vload(v0 + d) + b * vload(v1 + d));
  for (; d < D; ++d) acc[d] += p0 * v0[d] + p1 * v1[d];
}

// acc[0:D] += p * v[0:D], v in the cache's type.
template <typename T, typename S>
inline void axpy(T p, const S* v, T* acc, int64_t D) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const V pv = vsplat(p);
  int64_t d = 0;
  for (; d + W <= D; d += W) vstore(acc + d, vload(acc + d) + pv * load_vec<T>(v + d));
  for (; d < D; ++d) acc[d] += p * static_cast<T>(v[d]);
}

// Row-dot path, position-major: for each key position of the tile, the K rows of every kv head
// (one contiguous run of Hkv * D elements in the (B, S, Hkv, D) cache) are read once and dotted with
// the query rows of their group. S row r = h * Sq + i holds the scores of head h, new token i.
template <typename S, typename T>
inline void scores_by_rows(const S* kbase, int64_t stride, int64_t nk, int64_t Hkv, int64_t group_rows, int64_t D,
                           int64_t Dp, DecodeScratch<T>& ws, int64_t tile) {
  if (group_rows == 1) {  // one use per key row: widen in registers
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t hk = 0; hk < Hkv; ++hk) ws.s[hk * tile + j] = dot(ws.q.data() + hk * Dp, kbase + j * stride + hk * D, D);
    return;
  }
  int64_t j = 0;
  for (; j + 2 <= nk; j += 2) {  // several uses: widen once, two keys per pass over the query rows
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const T* k0 = compute_row(kbase + j * stride + hk * D, D, ws.row.data());
      const T* k1 = compute_row(kbase + (j + 1) * stride + hk * D, D, ws.row2.data());
      for (int64_t r = hk * group_rows; r < (hk + 1) * group_rows; ++r)
        dot2(ws.q.data() + r * Dp, k0, k1, D, ws.s[r * tile + j], ws.s[r * tile + j + 1]);
    }
  }
  for (; j < nk; ++j)
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const T* kr = compute_row(kbase + j * stride + hk * D, D, ws.row.data());
      for (int64_t r = hk * group_rows; r < (hk + 1) * group_rows; ++r)
        ws.s[r * tile + j] = dot(ws.q.data() + r * Dp, kr, D);
    }
}

// Row-dot path: acc_r = alpha_r * acc_r + sum_j P[r, j] v_j, V read position-major like K.
template <typename S, typename T>
inline void accumulate_by_rows(const S* vbase, int64_t stride, int64_t nk, int64_t Hkv, int64_t group_rows,
                               int64_t D, int64_t Dp, DecodeScratch<T>& ws, int64_t tile) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const int64_t rows = Hkv * group_rows;
  for (int64_t r = 0; r < rows; ++r) {
    if (ws.alpha[r] == T(1)) continue;
    T* ar = ws.acc.data() + r * Dp;
    const V a = vsplat(ws.alpha[r]);
    for (int64_t e = 0; e < Dp; e += W) vstore(ar + e, vload(ar + e) * a);
  }
  if (group_rows == 1) {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const T p = ws.s[hk * tile + j];
        if (p != T(0)) axpy(p, vbase + j * stride + hk * D, ws.acc.data() + hk * Dp, D);
      }
    return;
  }
  int64_t j = 0;
  for (; j + 2 <= nk; j += 2) {
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const T* v0 = compute_row(vbase + j * stride + hk * D, D, ws.row.data());
      const T* v1 = compute_row(vbase + (j + 1) * stride + hk * D, D, ws.row2.data());
      for (int64_t r = hk * group_rows; r < (hk + 1) * group_rows; ++r)
        axpy2(ws.s[r * tile + j], v0, ws.s[r * tile + j + 1], v1, ws.acc.data() + r * Dp, D);
    }
  }
  for (; j < nk; ++j)
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const T* vr = compute_row(vbase + j * stride + hk * D, D, ws.row.data());
      for (int64_t r = hk * group_rows; r < (hk + 1) * group_rows; ++r) {
        const T p = ws.s[r * tile + j];
        if (p != T(0)) axpy(p, vr, ws.acc.data() + r * Dp, D);
      }
    }
}

template <typename S>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* seqlens,
                   const BlockKeep& keep, double softmax_scale, int64_t left, int64_t num_splits, at::Tensor& out,
                   at::Tensor& lse, int64_t map_cols, bool map_max, at::Tensor& map) {
  using T = compute_t<S>;
  constexpr int64_t NR = kGemmN<T>;
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Smax = k.size(1), Hkv = k.size(2), G = H / Hkv;
  const int64_t group_rows = G * Sq, rows = H * Sq;  // row r = h * Sq + i
  const int64_t Dp = round_up(D, NR);
  const T c = static_cast<T>(softmax_scale * kLog2e);
  const bool dot_path = group_rows <= kDotPathRows;

  std::vector<int64_t> lens(B);
  int64_t maxlen = 0;
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = std::clamp<int64_t>(seqlens[b], 0, Smax);
    maxlen = std::max(maxlen, lens[b]);
  }
  // A tile never straddles two mask key blocks.
  const int64_t tile = keep.present() ? std::min(keep.block_k, kMaxTile) : kTileKeys;
  const int64_t stile = std::max(tile, kTileKeys);
  int64_t splits = num_splits;
  if (splits <= 0) {  // enough tasks for the threads, splits of at least kMinSplitKeys keys
    const int64_t threads = at::get_num_threads();
    splits = std::min((2 * threads + B - 1) / B, std::max<int64_t>(1, maxlen / kMinSplitKeys));
  }
  splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, (maxlen + tile - 1) / tile));
  const int64_t chunk = round_up((maxlen + splits - 1) / splits, tile);

  auto opts = q.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor opart = at::empty({B * splits, rows, D}, opts);
  at::Tensor lpart = at::empty({B * splits, rows}, opts);
  // block map: each split's map blocks (a block may straddle two splits), relative to its lse
  const bool with_map = map_cols > 0;
  const int64_t map_blocks = with_map ? chunk / map_cols + 2 : 0;
  at::Tensor mpart = at::empty({with_map ? B * splits * rows * map_blocks : 0}, opts);
  T* mp = mpart.data_ptr<T>();
  T* op = opart.data_ptr<T>();
  T* lp = lpart.data_ptr<T>();
  const S *qp = q.data_ptr<S>(), *kp = k.data_ptr<S>(), *vp = v.data_ptr<S>();
  const int64_t sq_b = q.stride(0), sq_s = q.stride(1), sq_h = q.stride(2);
  const int64_t sk_b = k.stride(0), sk_s = k.stride(1), sk_h = k.stride(2);
  const int64_t sv_b = v.stride(0), sv_s = v.stride(1), sv_h = v.stride(2);
  TORCH_CHECK(!dot_path || (sk_h == D && sv_h == D), "decode: the cache's heads must be contiguous (stride D)");

  // One task per (batch, split): all heads together, so the cache is read front to back.
  run_tasks(
      B * splits,
      [&](int64_t t) {
        const int64_t b = t / splits, s0 = (t % splits) * chunk;
        return std::max<int64_t>(0, std::min(s0 + chunk, lens[b]) - s0);
      },
      [&] { return DecodeScratch<T>(rows, Dp, stile, map_blocks); },
      [&](int64_t t, DecodeScratch<T>& ws) {
        const int64_t b = t / splits, split = t % splits;
        const int64_t seqlen = lens[b], s0 = split * chunk, s1 = std::min(s0 + chunk, seqlen);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < Sq; ++i)
            load_row(qp + b * sq_b + i * sq_s + h * sq_h, D, c, ws.q.data() + (h * Sq + i) * Dp, Dp);
        std::fill(ws.m.begin(), ws.m.end(), -std::numeric_limits<T>::infinity());
        std::fill(ws.l.begin(), ws.l.end(), T(0));
        std::fill(ws.acc.begin(), ws.acc.end(), T(0));
        const int64_t first_block = with_map ? s0 / map_cols : 0;
        if (with_map) std::fill(ws.map_ref.begin(), ws.map_ref.end(), -std::numeric_limits<T>::infinity());
        auto map_rows = [&](int64_t r0, int64_t r1, int64_t t0) {
          if (!with_map) return;
          for (int64_t r = r0; r < r1; ++r)
            accumulate_map_row(ws.s.data() + r * stile, ws.spans[r], t0, map_cols, first_block, ws.m[r], map_max,
                               ws.map_val.data() + r * map_blocks, ws.map_ref.data() + r * map_blocks);
        };
        const S* kbase = kp + b * sk_b;
        const S* vbase = vp + b * sv_b;
        for (int64_t t0 = s0, t1; t0 < s1; t0 = t1) {
          t1 = std::min(t0 + tile, s1);
          const int64_t nk = t1 - t0, n = round_up(nk, NR);
          bool any = false;
          for (int64_t h = 0; h < H; ++h) {
            const bool kept = !keep.present();
            for (int64_t i = 0; i < Sq; ++i) {
              const int64_t r = h * Sq + i, pos = seqlen - Sq + i;
              const int64_t lo = left >= 0 ? std::max<int64_t>(0, pos - left) : 0;
              int64_t hi = std::min(seqlen, pos + 1);
              if (!kept && !keep.kept(b, h, i / keep.block_q, t0 / keep.block_k)) hi = lo;
              ws.spans[r] = {std::max(lo, t0) - t0, std::min(hi, t1) - t0};
              any |= !ws.spans[r].empty();
            }
          }
          if (!any) continue;
          if (dot_path) {
            scores_by_rows(kbase + t0 * sk_s, sk_s, nk, Hkv, group_rows, D, Dp, ws, stile);
            for (int64_t r = 0; r < rows; ++r)
              softmax_row(ws.s.data() + r * stile, n, ws.spans[r], ws.m[r], ws.l[r], ws.alpha[r]);
            map_rows(0, rows, t0);
            accumulate_by_rows(vbase + t0 * sv_s, sv_s, nk, Hkv, group_rows, D, Dp, ws, stile);
            continue;
          }
          for (int64_t hk = 0; hk < Hkv; ++hk) {  // packed GEMM path, one kv group at a time
            const int64_t r0 = hk * group_rows;
            bool group_any = false;
            for (int64_t r = r0; r < r0 + group_rows; ++r) group_any |= !ws.spans[r].empty();
            if (!group_any) continue;
            std::fill(ws.kpanel.begin(), ws.kpanel.begin() + n * D, T(0));
            pack_transposed_panels<NR>(kbase + t0 * sk_s + hk * sk_h, sk_s, 0, nk, D, T(1), ws.kpanel.data());
            T* srows = ws.s.data() + r0 * stile;
            gemm<T>(group_rows, n, D, ws.q.data() + r0 * Dp, Dp, ws.kpanel.data(), D * NR, srows, stile, false);
            for (int64_t r = r0; r < r0 + group_rows; ++r)
              softmax_row(ws.s.data() + r * stile, n, ws.spans[r], ws.m[r], ws.l[r], ws.alpha[r]);
            map_rows(r0, r0 + group_rows, t0);
            pack_row_panels<NR>(vbase + t0 * sv_s + hk * sv_h, sv_s, 0, nk, D, Dp, stile, T(1), ws.vpanel.data());
            gemm<T>(group_rows, Dp, nk, srows, stile, ws.vpanel.data(), stile * NR, ws.acc.data() + r0 * Dp, Dp, true,
                    ws.alpha.data() + r0);
          }
        }
        T* o = op + t * rows * D;
        T* l = lp + t * rows;
        for (int64_t r = 0; r < rows; ++r) {
          if (ws.l[r] == T(0)) {
            std::fill(o + r * D, o + (r + 1) * D, T(0));
            l[r] = -std::numeric_limits<T>::infinity();
          } else {
            const T inv = T(1) / ws.l[r];
            for (int64_t d = 0; d < D; ++d) o[r * D + d] = ws.acc[r * Dp + d] * inv;
            l[r] = static_cast<T>((ws.m[r] + std::log2(ws.l[r])) * kLn2);
          }
          if (with_map) {  // probabilities under this split's softmax: relative to its lse (base 2)
            T* mrow = mp + (t * rows + r) * map_blocks;
            const T lse2 = ws.l[r] == T(0) ? T(0) : ws.m[r] + std::log2(ws.l[r]);
            for (int64_t x = 0; x < map_blocks; ++x) {
              const T ref = ws.map_ref[r * map_blocks + x];
              mrow[x] = ref == -std::numeric_limits<T>::infinity() ? T(0)
                                                                   : ws.map_val[r * map_blocks + x] * exp2_scalar(ref - lse2);
            }
          }
        }
      });

  // Combine the splits of each (b, h, i) by their lse.
  S* outp = out.data_ptr<S>();
  T* mapp = with_map ? map.data_ptr<T>() : nullptr;
  const int64_t map_nk = with_map ? map.size(3) : 0;
  if (with_map) map.zero_();
  auto* lsep = lse.data_ptr<compute_t<S>>();
  const int64_t so_b = out.stride(0), so_s = out.stride(1), so_h = out.stride(2);
  at::parallel_for(0, B * H * Sq, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(D);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t b = x / (H * Sq), h = (x / Sq) % H, i = x % Sq, r = h * Sq + i;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t s = 0; s < splits; ++s) {
        const T ls = lp[(b * splits + s) * rows + r];
        mx = (ls != ls || ls > mx) && mx == mx ? ls : mx;  // NaN propagates
      }
      S* orow = outp + b * so_b + i * so_s + h * so_h;
      auto* lrow = lsep + (b * H + h) * Sq + i;
      if (mx == -std::numeric_limits<T>::infinity()) {
        std::fill(orow, orow + D, static_cast<S>(0.0f));
        *lrow = -std::numeric_limits<T>::infinity();
        continue;
      }
      T total = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t s = 0; s < splits; ++s) {
        const T ls = lp[(b * splits + s) * rows + r];
        if (ls == -std::numeric_limits<T>::infinity()) continue;
        const T w = std::exp(ls - mx);
        total += w;
        const T* o = op + ((b * splits + s) * rows + r) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * o[d];
      }
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<S>(acc[d] / total);
      *lrow = static_cast<T>(mx + std::log(total));
      if (with_map) {  // each split's map blocks, weighted by its share of the row's softmax
        T* mrow = mapp + ((b * H + h) * Sq + i) * map_nk;
        for (int64_t s = 0; s < splits; ++s) {
          const T ls = lp[(b * splits + s) * rows + r];
          if (ls == -std::numeric_limits<T>::infinity()) continue;
          const T w = std::exp(ls - mx) / total;
          const T* part = mp + ((b * splits + s) * rows + r) * map_blocks;
          const int64_t first = s * chunk / map_cols;
          for (int64_t x = 0; x < map_blocks && first + x < map_nk; ++x) {
            const T val = w * part[x];
            mrow[first + x] = map_max ? std::max(mrow[first + x], val) : mrow[first + x] + val;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attn_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_keep, int64_t block_q, int64_t block_k, double softmax_scale,
    int64_t window_left, int64_t num_splits, int64_t map_cols, bool map_max) {
  check_decode_shapes(q_in, k_in, v_in, cache_seqlens);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor lens = cache_seqlens.to(at::kInt).contiguous();
  BlockKeep keep;
  at::Tensor keep_t;
  if (block_keep.has_value() && block_keep->defined()) {
    keep_t = block_keep->to(at::kByte).contiguous();
    TORCH_CHECK(keep_t.dim() == 4, "block_keep must be (B, H, Nq, Nk)");
    keep = {keep_t.data_ptr<uint8_t>(), keep_t.size(0), keep_t.size(1), keep_t.size(2), keep_t.size(3), block_q,
            block_k};
  }
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = maybe_poison(at::empty(q.sizes(), q.options()));
  at::Tensor lse = maybe_poison(at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype)));
  // the block map per query row (B, H, Sq_new, ceil(S_max / map_cols)), pooled over query blocks in Python
  at::Tensor map = map_cols > 0 ? maybe_poison(at::empty({q.size(0), q.size(2), q.size(1), (k.size(1) + map_cols - 1) /
                                                                                                 map_cols},
                                                         q.options().dtype(lse_dtype)))
                                : at::empty({0}, q.options().dtype(lse_dtype));
  if (q.numel() == 0) return {out, lse, map};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attn_fwd_cpu", [&] {
    decode_kernel<scalar_t>(q, k, v, lens.data_ptr<int32_t>(), keep, softmax_scale, window_left, num_splits, out, lse,
                            map_cols, map_max, map);
  });
  return {out, lse, map};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnops, CPU, m) { m.impl("decode_attn_fwd", &decode_attn_fwd_cpu); }

}  // namespace attnops::cpu
