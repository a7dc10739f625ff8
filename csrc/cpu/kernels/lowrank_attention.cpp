// Low-rank-key attention (Loki) on the CPU: approximate scores from the first R components of the
// rotated queries and keys, the top-k keys per query, then exact softmax attention over them.
//
// Memory traffic is the point (decode is memory-bound): the scores read R of the D dims of each
// key, and the exact pass reads only the chosen K/V rows, so at R = D/4 and topk = N/8 a decoding
// step reads a quarter of the bytes of dense attention (MHA). Two ways to the scores:
//   - decoding (fewer than kTiledMinRows query rows per kv head, lowrank_passes): passes of queries; a task per
//     (batch, chunk of keys) reads the low-rank key rows front to back, every kv head, and dots each
//     with all the query rows of its group (a task per kv head read rows Hkv * D apart: page-sized
//     strides that defeat the prefetcher, as in the decode kernel), into a buffer of (queries of a
//     pass) x H x Sk values; then a task per (batch, query, head) finishes its row;
//   - prefill, chunks and decoding with wide groups (lowrank_tiled): the scores are a GEMM of a tile
//     of a kv head's query rows (its group's heads x new tokens) with its low-rank keys packed as
//     panels (bf16 products for a bf16 score plane where the CPU has them), into a tile of score rows
//     that the same task finishes while it is in cache.
// Finishing a row: the k-th largest score by bisection over its values, the chosen keys in
// ascending order, and exact attention over them. Never Sq x Sk scores.
//
// Selection rule (the reference's, attnops/ops/lowrank/reference.py): the newest `local` keys always;
// of the older ones the top (topk - local) scores, ties to the later key, NaN ranked highest.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/gemm_bf16.h"
#include "cpu/pack.h"
#include "cpu/parallel.h"
#include "cpu/rows.h"
#include "cpu/softmax.h"
#include "ops.h"

namespace attnops::cpu::ATTNOPS_ISA {
namespace {

constexpr int64_t kScoreChunk = 256;       // keys per scoring task
constexpr int64_t kScoreBudget = 1 << 23;  // score buffer elements per pass
constexpr int64_t kGatherBlock = 64;       // chosen keys per online-softmax step
// Query rows per kv head (new tokens x group size) from which the scores are a GEMM over packed low-rank keys
// (lowrank_tiled) rather than passes. Below it a pass reads the keys once for all its rows, and packing them would
// double the bytes; from 4 rows on the tiles win or tie although they pack, because the passes' score buffer
// (rows x H x Sk floats) has left the cache before its rows are finished. A 32K-key step (bf16 score plane, Zen 4):
// GQA-2 one token 12.7 -> 14.2 ms as tiles (so not below 4), GQA-4 a tie, GQA-8 11.1-11.9 -> 9.5-9.8, MQA
// 9.3-9.6 -> 6.0-7.7, MHA 4 tokens 54-57 -> 47-51 (DESIGN.md, Low-rank keys).
constexpr int64_t kTiledMinRows = 4;
constexpr int64_t kPanelBudget = int64_t(16) << 20;    // bytes of packed low-rank keys per wave
constexpr int64_t kScoreTileBytes = int64_t(256) << 10;  // a task's tile of score rows
constexpr int64_t kPackChunk = 1024;                   // keys per packing task (a multiple of the panel width)

// Which keys query row (b, i) may see: [0, end); the newest `local` of them are always chosen.
struct RowKeys {
  int64_t end;       // keys [0, end) are in view
  int64_t cand_end;  // [0, cand_end) compete on score, [cand_end, end) are the local keys
  int64_t choose;    // how many candidates are chosen; == cand_end when all of them are
};

inline RowKeys row_keys(int64_t len, int64_t Sq, int64_t i, bool causal, int64_t topk, int64_t local) {
  int64_t end = causal ? std::min(len, len - Sq + i + 1) : len;
  end = std::max<int64_t>(end, 0);
  if (end <= topk) return {end, end, end};
  const int64_t cand_end = std::max<int64_t>(end - local, 0);
  return {end, cand_end, topk - (end - cand_end)};
}

template <typename T>
struct RowScratch {
  std::vector<T> s, q, acc, row;
  std::vector<int64_t> idx, cand;
  RowScratch(int64_t Sk, int64_t topk, int64_t D)
      : s(kGatherBlock + Vec<T>::size), q(D), acc(D), row(D), idx(std::min(Sk, topk)), cand(Sk) {}
};

// Order-preserving integer keys of floats (-0.0 just below +0.0; no NaN): bisection over thresholds.
template <typename T>
using key_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
inline key_t<T> order_key(T x) {
  using K = key_t<T>;
  K i;
  std::memcpy(&i, &x, sizeof(T));
  return i >= 0 ? i : i ^ std::numeric_limits<K>::max();
}

template <typename T>
inline T from_order_key(key_t<T> k) {
  using K = key_t<T>;
  const K i = k >= 0 ? k : k ^ std::numeric_limits<K>::max();
  T x;
  std::memcpy(&x, &i, sizeof(T));
  return x;
}

// How many of s[0, m) are >= t: one vector compare and add per W scores.
template <typename T>
int64_t count_at_least(const T* s, int64_t m, T t) {
  using I = typename Vec<T>::itype;
  constexpr int W = Vec<T>::size;
  const vec_t<T> tv = vsplat(t);
  I acc = {};
  int64_t j = 0;
  for (; j + W <= m; j += W) acc += (I)(vload(s + j) >= tv);  // -1 in every lane that holds
  int64_t n = 0;
  for (int i = 0; i < W; ++i) n -= acc[i];
  for (; j < m; ++j) n += s[j] >= t;
  return n;
}

// The c-th largest of s[0, m) (1 <= c <= m; no NaN) by bisection over the order keys between the row's min and
// max: each step one vectorised counting pass, a step whose count is exactly c ends it (the answer is then the
// least score at or above the probe). Exact for any scores, ties included; ~20 streaming passes a row where
// nth_element took its mispredicted branches.
template <typename T>
T kth_largest_bisect(const T* s, int64_t m, int64_t c) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const auto vmin = [](V a, V b) { return a < b ? a : b; };
  T lo_v = s[0], hi_v = s[0];
  {
    V mn = vsplat(s[0]), mx = mn;
    int64_t j = 0;
    for (; j + W <= m; j += W) {
      const V x = vload(s + j);
      mn = x < mn ? x : mn;
      mx = x > mx ? x : mx;
    }
    lo_v = hreduce<T>(mn, vmin);
    hi_v = hmax<T>(mx);  // no NaN among the scores: the plain max
    for (; j < m; ++j) {
      lo_v = std::min(lo_v, s[j]);
      hi_v = std::max(hi_v, s[j]);
    }
  }
  if (count_at_least(s, m, hi_v) >= c) return hi_v;
  // count(>= from_order_key(lo)) >= c > count(>= from_order_key(hi))
  using U = std::make_unsigned_t<key_t<T>>;  // hi - lo overflows the signed keys (-2.0 to 2.0 spans 2^31 + 1)
  key_t<T> lo = order_key(lo_v), hi = order_key(hi_v);
  while (U(hi) - U(lo) > 1) {
    const key_t<T> mid = key_t<T>(U(lo) + (U(hi) - U(lo)) / 2);
    const T probe = from_order_key<T>(mid);
    const int64_t n = count_at_least(s, m, probe);
    if (n == c) {  // exactly c at or above the probe: the least of them is the c-th largest
      V lv = vsplat(std::numeric_limits<T>::infinity());
      const V pv = vsplat(probe);
      int64_t j = 0;
      for (; j + W <= m; j += W) {
        const V x = vload(s + j);
        lv = (x >= pv && x < lv) ? x : lv;
      }
      T least = hreduce<T>(lv, vmin);
      for (; j < m; ++j)
        if (s[j] >= probe) least = std::min(least, s[j]);
      return least;
    }
    (n > c ? lo : hi) = mid;
  }
  return from_order_key<T>(lo);
}

// The c-th largest of s[0, m) (1 <= c <= m), with in `cand` the ascending positions of every score at or above
// it. Bisection (kth_largest_bisect) replaced a strided sample's two bounds with nth_element on the band between:
// nth_element's data-dependent branches were 30% of a 4K-token prefill even on a band (perf), and the whole
// prefill went 360 -> 212 ms (README, Low-rank keys); decoding rows of 32K-64K keys measured the same either way.
template <typename T>
T kth_largest(const T* s, int64_t m, int64_t c, RowScratch<T>& ws, int64_t& ncand) {
  const T t = kth_largest_bisect(s, m, c);
  int64_t* cand = ws.cand.data();
  int64_t n = 0;
  for (int64_t j = 0; j < m; ++j) {
    cand[n] = j;
    n += s[j] >= t;
  }
  ncand = n;
  return t;
}

// The chosen keys of one row, ascending, into idx; returns how many. Scores hold no NaN (phase 1
// writes NaN as +inf).
template <typename T>
int64_t select_keys(const T* s, const RowKeys& rk, RowScratch<T>& ws) {
  int64_t* idx = ws.idx.data();
  if (rk.choose == rk.cand_end) {  // everything in view
    for (int64_t j = 0; j < rk.end; ++j) idx[j] = j;
    return rk.end;
  }
  const int64_t c = rk.choose;
  int64_t n = 0;
  if (c > 0) {
    int64_t ncand = 0;
    const T t = kth_largest(s, rk.cand_end, c, ws, ncand);
    const int64_t* cand = ws.cand.data();
    int64_t above = 0;
    for (int64_t x = 0; x < ncand; ++x) above += s[cand[x]] > t;
    int64_t ties = c - above;
    for (int64_t x = ncand - 1; x >= 0; --x) {  // descending: ties go to the later keys
      const T v = s[cand[x]];
      if (v > t || (v == t && ties-- > 0)) idx[n++] = cand[x];
    }
    std::reverse(idx, idx + n);
  }
  for (int64_t j = rk.cand_end; j < rk.end; ++j) idx[n++] = j;
  return n;
}

// Exact attention of one query row (ws.q, scaled for base 2) over its n chosen keys (ws.idx), in blocks
// of kGatherBlock: scores (K rows prefetched ahead, the block's V rows requested as its K rows are
// read), an online-softmax step, then P V while the V rows are in cache. Leaves the unnormalised
// output in ws.acc; returns the running max and sum (base 2).
template <typename S, typename T>
std::pair<T, T> attend_chosen(RowScratch<T>& ws, const S* kb, int64_t k_row, const S* vb, int64_t v_row, int64_t n,
                              int64_t D) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const int64_t* idx = ws.idx.data();
  T* s = ws.s.data();
  T* acc = ws.acc.data();
  std::fill(acc, acc + D, T(0));
  T m = -std::numeric_limits<T>::infinity(), l = 0, alpha = 1;
  for (int64_t x0 = 0; x0 < n; x0 += kGatherBlock) {
    const int64_t nb = std::min(kGatherBlock, n - x0);
    // W keys at a time, W independent dot products finished by one transpose-sum (a dot per key ended in a
    // horizontal sum that cost as much as its FMAs)
    int64_t x = 0;
    for (; x + W <= nb; x += W) {
      const S* keys[W];
      for (int y = 0; y < W; ++y) {
        keys[y] = kb + idx[x0 + x + y] * k_row;
        if (x0 + x + W + y < n) prefetch_row(kb + idx[x0 + x + W + y] * k_row, D);
        prefetch_row<1>(vb + idx[x0 + x + y] * v_row, D);  // into L2: used after the block's K rows
      }
      dots_block<1, W>(ws.q.data(), D, keys, D, s + x, 0);
    }
    for (; x < nb; ++x) {
      prefetch_row<1>(vb + idx[x0 + x] * v_row, D);
      s[x] = dot(ws.q.data(), kb + idx[x0 + x] * k_row, D);
    }
    const int64_t padded = (nb + W - 1) / W * W;
    softmax_row(s, padded, RowSpan{0, nb}, m, l, alpha);
    if (alpha != T(1)) {
      for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    }
    for (int64_t x = 0; x < nb; ++x) {
      if (x + 4 < nb) prefetch_row(vb + idx[x0 + x + 4] * v_row, D);
      const T* vr = compute_row(vb + idx[x0 + x] * v_row, D, ws.row.data());
      const V p = vsplat(s[x]);
      int64_t d = 0;
      for (; d + W <= D; d += W) vstore(acc + d, vload(acc + d) + p * vload(vr + d));
      for (; d < D; ++d) acc[d] += s[x] * vr[d];
    }
  }
  return {m, l};
}

// Chooses the keys of query row (b, i, h) from its low-rank scores `srow` (NaN already +inf), attends to them
// exactly, and writes the output row, its lse and (when asked) the chosen keys; both score paths end in it.
template <typename S, typename T>
struct RowFinisher {
  const S *qp, *kp, *vp;
  const at::Tensor &q, &k, &v, &out;
  S* op;
  T* lp;
  int32_t* chosen;
  const int32_t* lens;
  int64_t Sq, Sk, H, D, group, topk, local;
  bool causal;
  T scale;  // softmax_scale * log2(e): base-2 scores

  RowKeys keys(int64_t b, int64_t i) const { return row_keys(lens[b], Sq, i, causal, topk, local); }
  const S* k_head(int64_t b, int64_t h) const { return kp + b * k.stride(0) + h / group * k.stride(2); }
  const S* v_head(int64_t b, int64_t h) const { return vp + b * v.stride(0) + h / group * v.stride(2); }

  // The row's chosen keys into ws.idx, ascending (also into the chosen-keys output); returns how many.
  int64_t select(int64_t b, int64_t i, int64_t h, const T* srow, RowScratch<T>& ws) const {
    const RowKeys rk = keys(b, i);
    const int64_t n = rk.end > 0 ? select_keys(srow, rk, ws) : 0;
    if (chosen != nullptr) {  // (B, H, Sq, n_idx), -1 past the chosen keys
      const int64_t n_idx = std::min(Sk, topk);
      int32_t* c = chosen + ((b * H + h) * Sq + i) * n_idx;
      for (int64_t x = 0; x < n_idx; ++x) c[x] = x < n ? static_cast<int32_t>(ws.idx[x]) : -1;
    }
    return n;
  }

  // The query row times `scale`, into dst (D values).
  void load_query(int64_t b, int64_t i, int64_t h, T* dst) const {
    const S* qrow = qp + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(qrow[d]) * scale;
  }

  // Output row = acc / l and lse from the base-2 running max m and sum l; zeros and -inf where nothing (or only
  // -inf scores: infinite inputs) was attended.
  void store(int64_t b, int64_t i, int64_t h, const T* acc, T m, T l) const {
    S* orow = op + b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
    T* lrow = lp + (b * H + h) * Sq + i;
    if (l == T(0)) {
      std::fill(orow, orow + D, static_cast<S>(0.0f));
      *lrow = -std::numeric_limits<T>::infinity();
      return;
    }
    const T inv = T(1) / l;
    for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<S>(acc[d] * inv);
    *lrow = static_cast<T>((m + std::log2(l)) * kLn2);
  }

  // Exact attention of the row over its n chosen keys (ws.idx), gathered row by row.
  void attend(int64_t b, int64_t i, int64_t h, int64_t n, RowScratch<T>& ws) const {
    if (n == 0) return store(b, i, h, nullptr, T(0), T(0));
    load_query(b, i, h, ws.q.data());
    const auto [m, l] = attend_chosen(ws, k_head(b, h), k.stride(1), v_head(b, h), v.stride(1), n, D);
    store(b, i, h, ws.acc.data(), m, l);
  }

  void operator()(int64_t b, int64_t i, int64_t h, const T* srow, RowScratch<T>& ws) const {
    attend(b, i, h, select(b, i, h, srow, ws), ws);
  }
};

// Decoding (fewer than kTiledMinRows query rows per kv head): passes of queries; phase 1 scores every row of a
// pass reading the low-rank key rows once, front to back (the bytes are the cost), phase 2 finishes the rows.
template <typename S, typename Ss, typename T>
void lowrank_passes(const at::Tensor& qs, const at::Tensor& ks, const RowFinisher<S, T>& finish) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const int64_t B = qs.size(0), Sq = finish.Sq, H = finish.H, Sk = finish.Sk, R = qs.size(3), group = finish.group;
  const Ss* qsp = qs.data_ptr<Ss>();
  const Ss* ksp = ks.data_ptr<Ss>();
  // score rows padded by a cache line: rows a power-of-two apart map to one L1 set, and phase 1
  // writes all of them in step
  const int64_t row_stride = Sk + 64 / int64_t(sizeof(T));
  const int64_t per_query = B * H * row_stride;
  const int64_t pass = std::clamp<int64_t>(kScoreBudget / per_query, 1, Sq);
  std::vector<T> scores(pass * per_query);

  for (int64_t i0 = 0; i0 < Sq; i0 += pass) {
    const int64_t nq = std::min(pass, Sq - i0);
    // 1. low-rank scores of every (query, head) row of the pass: scores[((b * nq + i) * H + h) * row_stride + j]
    const int64_t chunks = (Sk + kScoreChunk - 1) / kScoreChunk;
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> qrows(nq * H * R);
      std::vector<int64_t> koff(nq * H);  // each row's kv head offset in a key row
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, j0 = (task % chunks) * kScoreChunk;
        int64_t last = 0;  // one past the last key any row of the pass scores
        for (int64_t i = i0; i < i0 + nq; ++i)
          last = std::max(last, finish.keys(b, i).cand_end);
        const int64_t j1 = std::min(j0 + kScoreChunk, last);
        if (j1 <= j0) continue;
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t h = 0; h < H; ++h) {
            const Ss* src = qsp + b * qs.stride(0) + (i0 + i) * qs.stride(1) + h * qs.stride(2);
            for (int64_t r = 0; r < R; ++r) qrows[(i * H + h) * R + r] = static_cast<T>(src[r]);
          }
        const T inf = std::numeric_limits<T>::infinity();
        const int64_t rows = nq * H;  // row (i, h) of the pass, kv head h / group
        T* srow = scores.data() + b * rows * row_stride;
        for (int64_t rr = 0; rr < rows; ++rr) koff[rr] = (rr % H) / group * ks.stride(2);
        for (int64_t j = j0; j < j1; ++j) {
          // W rows at a time: W accumulators finished by one transpose-sum (an hsum per row
          // dominated this phase); the key's head vectors are read in memory order
          const Ss* kr = ksp + b * ks.stride(0) + j * ks.stride(1);
          int64_t rr = 0;
          for (; rr + W <= rows; rr += W) {
            V acc[W] = {};
            int64_t r = 0;
            for (; r + W <= R; r += W)
              for (int x = 0; x < W; ++x)
                acc[x] += vload(qrows.data() + (rr + x) * R + r) * load_vec<T>(kr + koff[rr + x] + r);
            V sums = transpose_sum<T>(acc);
            for (; r < R; ++r)
              for (int x = 0; x < W; ++x)
                sums[x] += qrows[(rr + x) * R + r] * static_cast<T>(kr[koff[rr + x] + r]);
            sums = sums != sums ? vsplat(inf) : sums;  // NaN ranks highest (it reaches the output)
            for (int x = 0; x < W; ++x) srow[(rr + x) * row_stride + j] = sums[x];
          }
          for (; rr < rows; ++rr) {
            const T x = dot(qrows.data() + rr * R, kr + koff[rr], R);
            srow[rr * row_stride + j] = x != x ? inf : x;
          }
        }
      }
    });

    // 2. per row: choose the keys, attend to them exactly
    run_tasks(
        B * nq * H,
        [&](int64_t t) { return finish.keys(t / (nq * H), i0 + (t / H) % nq).end; },
        [&] { return RowScratch<T>(Sk, finish.topk, finish.D); },
        [&](int64_t t, RowScratch<T>& ws) {
          finish(t / (nq * H), i0 + (t / H) % nq, t % H, scores.data() + t * row_stride, ws);
        });
  }
}

// Prefill, chunks and wide groups: the scores are a GEMM. Per wave of (batch, kv head) pairs the low-rank keys
// are packed once as K_s^T panels (cpu/gemm.h; bf16 word panels where the bf16 products run); a task takes a
// tile of the pair's query rows (its group's heads x new tokens), multiplies their low-rank rows with the panel
// into a tile of score rows (~256 KB: it stays in L2) and finishes each row from it. The pass path's per-key dots over every row of a
// pass cost 26% of a 4K-token prefill, and its column-wise score writes missed the cache.
template <typename S, typename Ss, typename T>
void lowrank_tiled(const at::Tensor& qs, const at::Tensor& ks, const RowFinisher<S, T>& finish) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  constexpr int NR = kGemmN<T>;
  constexpr bool kDot = kDotFor<Ss> && std::is_same_v<T, float>;
  const bool dot = kDot && bf16_dot();
  const bool brgemm = dot && bf16_brgemm();  // the amx level: the same products through oneDNN's brgemm
  const int64_t B = qs.size(0), Sq = finish.Sq, H = finish.H, Sk = finish.Sk, R = qs.size(3), group = finish.group;
  const int64_t Hkv = H / group, R2 = (R + 1) / 2;
  const Ss* qsp = qs.data_ptr<Ss>();
  const Ss* ksp = ks.data_ptr<Ss>();
  const int64_t Sk_pad = round_up(Sk, NR);
  // one pair's panel, in T elements or (dot) in words
  const int64_t panel = dot ? Sk_pad * R2 : Sk_pad * R;
  const int64_t panel_bytes = std::max<int64_t>(1, panel * (dot ? int64_t(sizeof(uint32_t)) : int64_t(sizeof(T))));
  const int64_t wave = std::clamp<int64_t>(kPanelBudget / panel_bytes, 1, B * Hkv);
  std::vector<T> panels(dot ? 0 : wave * panel);
  std::vector<uint32_t> pair_panels(dot ? wave * panel : 0);
  const int64_t row_stride = round_up(Sk, W) + 64 / int64_t(sizeof(T));  // see lowrank_passes
  // A pair's rows are its group's heads' query rows, head by head (row r: head r / Sq of the group, token r % Sq):
  // a decoding step of a wide group is one GEMM over the panel, not one matrix-vector product per head. Tiles
  // shrink when the wave's pairs would leave threads idle.
  const int64_t pair_rows = group * Sq;
  int64_t tile_rows = std::clamp<int64_t>(kScoreTileBytes / (row_stride * int64_t(sizeof(T))) / 8 * 8, 8, 64);
  const int64_t want_tiles = (2 * int64_t(at::get_num_threads()) + wave - 1) / wave;  // per pair
  tile_rows = std::clamp<int64_t>((pair_rows + want_tiles - 1) / want_tiles, 1, tile_rows);
  const int64_t tiles = (pair_rows + tile_rows - 1) / tile_rows;
  const int64_t pack_chunks = (Sk + kPackChunk - 1) / kPackChunk;
  struct Scratch {
    RowScratch<T> rows;
    std::vector<T> s, a;     // a tile of score rows; its query rows (float path)
    std::vector<uint32_t> a2;  // its query rows as bf16 pairs (dot path)
  };

  for (int64_t p0 = 0; p0 < B * Hkv; p0 += wave) {
    const int64_t p1 = std::min(p0 + wave, B * Hkv);
    at::parallel_for(0, (p1 - p0) * pack_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pair = p0 + task / pack_chunks, b = pair / Hkv, hk = pair % Hkv;
        const int64_t r0 = (task % pack_chunks) * kPackChunk, r1 = std::min(Sk, r0 + kPackChunk);
        const Ss* src = ksp + b * ks.stride(0) + hk * ks.stride(2);
        if constexpr (kDot) {
          if (dot) {
            pack_transposed_pairs<NR>(reinterpret_cast<const c10::BFloat16*>(src), ks.stride(1), r0, r1, R,
                                      pair_panels.data() + (pair - p0) * panel, /*last=*/r1 == Sk);
            continue;
          }
        }
        T* dst = panels.data() + (pair - p0) * panel;
        if (r1 == Sk) zero_padding_panels<NR>(dst, 1, Sk, R);
        pack_transposed_panels<NR>(src, ks.stride(1), r0, r1, R, T(1), dst);
      }
    });

    auto tile_range = [&](int64_t t, int64_t& b, int64_t& r0, int64_t& r1) {
      b = (p0 + t / tiles) / Hkv;
      r0 = (t % tiles) * tile_rows;
      r1 = std::min(pair_rows, r0 + tile_rows);
    };
    run_tasks(
        (p1 - p0) * tiles,
        [&](int64_t t) {
          int64_t b, r0, r1;
          tile_range(t, b, r0, r1);
          int64_t cost = 0;
          for (int64_t r = r0; r < r1; ++r) cost += finish.keys(b, r % Sq).end;
          return cost;
        },
        [&] {
          return Scratch{RowScratch<T>(Sk, finish.topk, finish.D), std::vector<T>(tile_rows * row_stride),
                         std::vector<T>(dot ? 0 : tile_rows * R), std::vector<uint32_t>(dot ? tile_rows * R2 : 0)};
        },
        [&](int64_t t, Scratch& ws) {
          int64_t b, r0, r1;
          tile_range(t, b, r0, r1);
          int64_t last = 0;  // one past the last key a row of the tile scores
          for (int64_t r = r0; r < r1; ++r) last = std::max(last, finish.keys(b, r % Sq).cand_end);
          const int64_t pair = p0 + t / tiles, h0 = (pair % Hkv) * group, M = r1 - r0;
          auto qrow = [&](int64_t r) {
            return qsp + b * qs.stride(0) + (r % Sq) * qs.stride(1) + (h0 + r / Sq) * qs.stride(2);
          };
          if (last > 0) {
            const int64_t N = round_up(last, W);
            bool done = false;
            if constexpr (kDot) {
              if (dot) {
                auto* a = reinterpret_cast<uint16_t*>(ws.a2.data());
                for (int64_t i = 0; i < M; ++i) {
                  const auto* src = reinterpret_cast<const uint16_t*>(qrow(r0 + i));
                  std::copy(src, src + R, a + i * 2 * R2);
                  if (R % 2) a[i * 2 * R2 + R] = 0;
                }
                gemm_bf16_via(brgemm, M, N, R2, ws.a2.data(), R2, pair_panels.data() + (pair - p0) * panel,
                              R2 * NR, ws.s.data(), row_stride, false);
                if (brgemm) at::native::cpublas::brgemm_release();  // hands back the AMX tile state
                done = true;
              }
            }
            if (!done) {
              for (int64_t i = 0; i < M; ++i) load_row(qrow(r0 + i), R, T(1), ws.a.data() + i * R, R);
              gemm<T>(M, N, R, ws.a.data(), R, panels.data() + (pair - p0) * panel, R * NR, ws.s.data(),
                      row_stride, false);
            }
            const V inf = vsplat(std::numeric_limits<T>::infinity());
            for (int64_t i = 0; i < M; ++i) {  // NaN ranks highest (it reaches the output)
              T* srow = ws.s.data() + i * row_stride;
              for (int64_t j = 0; j < N; j += W) {
                const V x = vload(srow + j);
                vstore(srow + j, x != x ? inf : x);
              }
            }
          }
          for (int64_t r = r0; r < r1; ++r)
            finish(b, r % Sq, h0 + r / Sq, ws.s.data() + (r - r0) * row_stride, ws.rows);
        });
  }
}

// S: the type of q, k, v; Ss: that of the low-rank scores' inputs (S, or a half-width plane).
template <typename S, typename Ss>
void lowrank_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& qs,
                    const at::Tensor& ks, const int32_t* lens, int64_t topk, int64_t local, bool causal,
                    double softmax_scale, at::Tensor& out, at::Tensor& lse, int32_t* chosen) {
  using T = compute_t<S>;
  const RowFinisher<S, T> finish{q.data_ptr<S>(), k.data_ptr<S>(), v.data_ptr<S>(),
                                 q, k, v, out, out.data_ptr<S>(), lse.data_ptr<T>(), chosen, lens,
                                 q.size(1), k.size(1), q.size(2), q.size(3), q.size(2) / k.size(2), topk, local,
                                 causal, static_cast<T>(softmax_scale * kLog2e)};
  if (q.size(1) * (q.size(2) / k.size(2)) >= kTiledMinRows)
    lowrank_tiled<S, Ss, T>(qs, ks, finish);
  else
    lowrank_passes<S, Ss, T>(qs, ks, finish);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_attn_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& qs_in,
                                                        const at::Tensor& ks_in,
                                                        const c10::optional<at::Tensor>& seqlens, int64_t topk,
                                                        int64_t local, bool causal, double softmax_scale,
                                                        bool return_indices) {
  constexpr const char* op = "lowrank_attn_fwd";
  check_qkv_args(op, q_in, k_in, v_in);
  check_scale_arg(op, softmax_scale);
  TORCH_CHECK(qs_in.dim() == 4 && ks_in.dim() == 4, op, ": q_score and k_score must be 4-d");
  TORCH_CHECK(qs_in.sizes().slice(0, 3) == q_in.sizes().slice(0, 3) &&
                  ks_in.sizes().slice(0, 3) == k_in.sizes().slice(0, 3) && qs_in.size(3) == ks_in.size(3) &&
                  qs_in.size(3) >= 1 && qs_in.size(3) <= q_in.size(3),
              op, ": q_score (B, Sq, H, R) and k_score (B, Sk, Hkv, R) must fit q and k with 1 <= R <= D");
  TORCH_CHECK(qs_in.device() == q_in.device() && ks_in.device() == q_in.device(), op,
              ": q_score and k_score must be on q's device");
  TORCH_CHECK(topk >= 1 && local >= 0 && local <= topk, op, ": need topk >= 1 and 0 <= local <= topk, got topk=",
              topk, ", local=", local);
  const auto dtype = q_in.scalar_type();
  const auto score_dtype = qs_in.scalar_type();
  TORCH_CHECK(ks_in.scalar_type() == score_dtype && (score_dtype == dtype || score_dtype == at::kBFloat16 ||
                                                      score_dtype == at::kHalf),
              "lowrank_attn_fwd: q_score and k_score must share a dtype: q's, bfloat16 or float16");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor qs = last_dim_contiguous(qs_in), ks = last_dim_contiguous(ks_in);
  const int64_t B = q.size(0), Sk = k.size(1);
  topk = std::min<int64_t>(topk, std::max<int64_t>(Sk, 1));  // more than Sk is all of them
  local = std::min(local, topk);
  at::Tensor lens;
  if (seqlens.has_value() && seqlens->defined()) {
    lens = checked_lengths(op, "seqlens", *seqlens, B, Sk);
  } else {
    lens = at::full({B}, Sk, q.options().dtype(at::kInt));
  }
  const auto lse_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = empty_output(q.sizes(), q.options());
  at::Tensor lse = empty_output({B, q.size(2), q.size(1)}, q.options().dtype(lse_dtype));
  at::Tensor indices = return_indices
                           ? at::empty({B, q.size(2), q.size(1), std::min(Sk, topk)}, q.options().dtype(at::kInt))
                           : at::empty({0}, q.options().dtype(at::kInt));
  if (q.numel() == 0) return {out, lse, indices};
  int32_t* chosen = return_indices ? indices.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_attn_fwd_cpu", [&] {
    const int32_t* lp = lens.data_ptr<int32_t>();
    if (score_dtype == dtype) {
      lowrank_kernel<scalar_t, scalar_t>(q, k, v, qs, ks, lp, topk, local, causal, softmax_scale, out, lse,
                                             chosen);
    } else if (score_dtype == at::kBFloat16) {
      lowrank_kernel<scalar_t, c10::BFloat16>(q, k, v, qs, ks, lp, topk, local, causal, softmax_scale, out, lse,
                                             chosen);
    } else {
      lowrank_kernel<scalar_t, c10::Half>(q, k, v, qs, ks, lp, topk, local, causal, softmax_scale, out, lse,
                                             chosen);
    }
  });
  return {out, lse, indices};
}

}  // namespace


}  // namespace attnops::cpu::ATTNOPS_ISA
