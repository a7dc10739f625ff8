// Split-KV ("flash-decoding") attention of a few new queries against a KV cache, on the CPU.
//
// One task per (batch, split of the cache length) over every head: each K/V element is read from
// memory once for all the query heads of its group, and the (B, S, Hkv, D) cache front to back (a
// task per (batch, kv head) read key rows 16 KB apart at Hkv = 32 and reached 17% of the copy
// bandwidth). Tasks write a partial output and lse per row; a combine step merges them by lse.
// Causal within the new tokens: new query i of sequence b sits at position seqlen_b - Sq_new + i and
// sees keys [pos - left, pos] of the cache (left: optional window). An optional per-(batch, head)
// bitmap of kept key blocks (from a BlockMask) restricts the keys.
//
// Decode is memory-bound up to a few query rows per kv group and compute-bound beyond (MQA at 32
// heads: 16 flops per f32 byte), so K is never repacked: scores come from register blocks of 4
// query rows x 2 cache rows read in place. P V adds cache rows straight into the accumulators for
// groups of up to 4 rows; larger groups pack a V panel and use the GEMM micro-kernel, which keeps
// the output tile in registers. Groups of more than 16 rows (MQA / wide GQA: compute-bound) with a bf16
// cache at a level with bf16 products (cpu/gemm_bf16.h) multiply in bf16 instead: S^T = K q^T with the
// cache rows read in place as the A operand (bf16 along D are already pairs), P V with P rounded to bf16.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/gemm_bf16.h"
#include "cpu/pack.h"
#include "cpu/rows.h"
#include "cpu/parallel.h"
#include "cpu/score_mods.h"
#include "cpu/softmax.h"
#include "ops.h"

namespace attnops::cpu::ATTNOPS_ISA {
namespace {

constexpr int64_t kTileKeys = 64;
constexpr int64_t kMaxTile = 256;
// Automatic splits hold at least one tile of keys. A short cache is read at the bandwidth of one core's caches,
// not computed: on the Zen 4 VM (2 threads, one token) two splits took MHA H8 D64 from 20.5 to 16.5 us at 128
// keys and 53.5 to 38.6 us at 512, GQA H32/8 D128 from 220 to 124 us at 512 (the rule was 512 keys a split).
constexpr int64_t kMinSplitKeys = kTileKeys;
constexpr int64_t kDeterministicSplitKeys = 2048;  // the deterministic schedule's, from the length alone
constexpr int64_t kDeterministicSplits = 32;  // splits of >= 2K keys, at most 32 (64K+ caches)

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
  std::vector<T> q, s, acc, m, l, alpha, vpanel;
  std::vector<T> part;  // a tile's P V of the small groups, summed from zero before it joins acc
  std::vector<RowSpan> spans;
  std::vector<uint8_t> active;  // per kv head: a row of its group has a valid key in the tile
  // block map: per (row, map block of the split) the sum (or max) of P and the running max it is
  // relative to (a block can span tiles between which the max grows)
  std::vector<T> map_val, map_ref;
  // bf16 products: each group's q^T as bf16-pair panels (dot_words a kv head), the tile's S^T (keys x padded
  // rows), P rows as pairs along the keys, the V tile as row-pair panels
  std::vector<uint32_t> qt2, p2, vpair;
  std::vector<T> st;
  // the bf16 products on paged caches whose pages do not hold whole tiles: a tile's K and V rows gathered from
  // their pages, (tile, Hkv, D) in the cache's type (raw bytes: the scratch is typed by the compute type)
  std::vector<uint8_t> kgather, vgather;
  DecodeScratch(int64_t rows, int64_t kv_heads, int64_t Dp, int64_t tile, int64_t map_blocks, int64_t dot_words,
                int64_t dot_cols, int64_t gather_bytes = 0)
      : q(dot_words ? 0 : rows * Dp), s(rows * tile), acc(rows * Dp), m(rows), l(rows), alpha(rows),
        vpanel(dot_words ? 0 : tile * Dp), part(dot_words ? 0 : rows * Dp), spans(rows), active(kv_heads), map_val(rows * map_blocks),
        map_ref(rows * map_blocks), qt2(kv_heads * dot_words), p2(dot_words ? rows * tile / 2 : 0), vpair(dot_words ? tile / 2 * Dp : 0),
        st(dot_words ? tile * dot_cols : 0), kgather(gather_bytes), vgather(gather_bytes) {}
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

// acc_r[0:D] += sum_j p[r * ld + j] v_j[0:D] for R rows (Dp apart): each V vector is loaded and
// widened once for the R rows, and each accumulator is read and written once per NK keys.
template <int R, int NK, typename T, typename S>
inline void axpy_block(const T* p, int64_t ld, const S* const* v, T* acc, int64_t Dp, int64_t D) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V pv[R * NK];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NK; ++j) pv[r * NK + j] = vsplat(p[r * ld + j]);
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V x[NK];
    for (int j = 0; j < NK; ++j) x[j] = load_vec<T>(v[j] + d);
    for (int r = 0; r < R; ++r) {
      V y = vload(acc + r * Dp + d);
      for (int j = 0; j < NK; ++j) y += pv[r * NK + j] * x[j];
      vstore(acc + r * Dp + d, y);
    }
  }
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NK; ++j) acc[r * Dp + d] += p[r * ld + j] * static_cast<T>(v[j][d]);
}

constexpr int kRowBlock = 4;  // query rows per register block: 4 rows x 2 keys = 8 accumulators
// Key positions the grouped paths request ahead, across tile ends up to the end of the split
// (`ahead`: the keys left from the tile start). With compute between the loads the hardware
// prefetcher alone left them at half the streaming bandwidth; 4 to 16 ahead measured alike.
constexpr int64_t kPrefetchKeys = 8;

// The cache rows of a tile's keys (kv head 0; a head's row is head_stride further): key j at base + j * stride,
// or, for a tile across the pages of a paged cache, in its own page, so that such a tile is read in place (it was
// copied into scratch first: a quarter of an MQA step on 16-row pages). A division per key pair, against D-element
// rows dotted with every query row of a group.
template <typename S>
struct TileRows {
  const S* base;
  int64_t stride;
  const int32_t* pages = nullptr;  // paged: the sequence's table from the tile's first page on
  int64_t page = 1, first = 0, page_stride = 0;  // rows per page, the tile's first row in its page, the page stride
  const S* operator()(int64_t j) const {
    if (pages == nullptr) return base + j * stride;
    const int64_t t = first + j;
    return base + pages[t / page] * page_stride + (t % page) * stride;
  }
};

// The grouped paths' walk over a tile, position-major: for each pair of key positions and each kv
// head with a valid key in the tile, its two cache rows (requested kPrefetchKeys positions ahead)
// and its query rows in register blocks: f.template operator()<R, NK>(rows, r, j) for the R <=
// kRowBlock query rows from row r and the NK (2, or 1 at an odd end) cache rows from position j.
template <typename S, typename F>
inline void for_row_blocks(const TileRows<S>& keys, int64_t head_stride, int64_t nk, int64_t ahead, int64_t Hkv,
                           int64_t group_rows, int64_t D, const uint8_t* active, F&& f) {
  for (int64_t j = 0; j < nk; j += 2) {
    const S* pair[2] = {keys(j), keys(std::min(j + 1, nk - 1))};
    const bool fetch = j + kPrefetchKeys + 1 < ahead;
    const S* next[2] = {fetch ? keys(j + kPrefetchKeys) : nullptr, fetch ? keys(j + kPrefetchKeys + 1) : nullptr};
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      if (!active[hk]) continue;
      if (fetch) {
        prefetch_row(next[0] + hk * head_stride, D);
        prefetch_row(next[1] + hk * head_stride, D);
      }
      const S* rows[2] = {pair[0] + hk * head_stride, pair[1] + hk * head_stride};
      for (int64_t r = hk * group_rows; r < (hk + 1) * group_rows; r += kRowBlock) {
        auto block = [&]<int R>() {  // register blocks need R and NK at compile time
          if (j + 1 < nk)
            f.template operator()<R, 2>(rows, r, j);
          else
            f.template operator()<R, 1>(rows, r, j);
        };
        switch (std::min<int64_t>((hk + 1) * group_rows - r, kRowBlock)) {
          case 1: block.template operator()<1>(); break;
          case 2: block.template operator()<2>(); break;
          case 3: block.template operator()<3>(); break;
          default: block.template operator()<4>(); break;
        }
      }
    }
  }
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

// acc_r = alpha_r * acc_r (the online softmax's rescaling, before P V adds the tile).
template <typename T>
inline void rescale_rows(T* acc, const T* alpha, int64_t rows, int64_t Dp) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  for (int64_t r = 0; r < rows; ++r) {
    if (alpha[r] == T(1)) continue;
    T* ar = acc + r * Dp;
    const V a = vsplat(alpha[r]);
    for (int64_t e = 0; e < Dp; e += W) vstore(ar + e, vload(ar + e) * a);
  }
}

// acc_r = alpha_r * acc_r + part_r (a tile's product joins the running sum once), and part cleared for the next.
template <typename T>
inline void merge_rows(T* acc, const T* alpha, T* part, int64_t rows, int64_t Dp) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  for (int64_t r = 0; r < rows; ++r) {
    T* ar = acc + r * Dp;
    T* pr = part + r * Dp;
    const V a = vsplat(alpha[r]);
    for (int64_t e = 0; e < Dp; e += W) {
      vstore(ar + e, vload(ar + e) * a + vload(pr + e));
      vstore(pr + e, V{});
    }
  }
}

// Scores of a tile, S[r, j] (row r = h * Sq + i), position-major: for each pair of key positions the
// K rows of every kv head (a contiguous run of Hkv * D elements in the (B, S, Hkv, D) cache, read
// front to back) are dotted with the query rows of their group, by register blocks of up to 4 rows x
// 2 keys. K is read in place: no transposed packing (it cost a fifth of the MQA step). Groups
// without a valid key in the tile (`active[hk] == 0`) are skipped; their rows are masked later.
template <typename S, typename T>
inline void tile_scores(const TileRows<S>& k, int64_t head_stride, int64_t nk, int64_t ahead, int64_t Hkv,
                        int64_t group_rows, int64_t D, int64_t Dp, const uint8_t* active, DecodeScratch<T>& ws,
                        int64_t ld) {
  const T* q = ws.q.data();
  T* s = ws.s.data();
  if (group_rows == 1) {  // MHA, one new token: one dot per key row; the stream needs no prefetch
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        if (active[hk]) s[hk * ld + j] = dot(q + hk * Dp, k(j) + hk * head_stride, D);
    return;
  }
  for_row_blocks(k, head_stride, nk, ahead, Hkv, group_rows, D, active,
                 [&]<int R, int NK>(const S* const* keys, int64_t r, int64_t j) {
                   dots_block<R, NK>(q + r * Dp, Dp, keys, D, s + r * ld + j, ld);
                 });
}

// acc_r = alpha_r * acc_r + sum_j P[r, j] v_j for groups of at most kRowBlock rows, V read
// position-major like K and added straight from the cache rows (no V panel: each row is used by
// few query rows). The tile's sum starts from zero (ws.part) and joins acc once: two-level summation, as the
// GEMM tiles (cpu/gemm.h); added key by key into acc, a 32K-key split was one float chain (v = 1 rows 31 ulp off).
template <typename S, typename T>
inline void tile_accumulate(const TileRows<S>& v, int64_t head_stride, int64_t nk, int64_t ahead, int64_t Hkv,
                            int64_t group_rows, int64_t D, int64_t Dp, const uint8_t* active, DecodeScratch<T>& ws,
                            int64_t ld) {
  const T* p = ws.s.data();
  T* part = ws.part.data();  // zero: cleared at the start of the pass and by every merge
  if (group_rows == 1) {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        if (p[hk * ld + j] != T(0)) axpy(p[hk * ld + j], v(j) + hk * head_stride, part + hk * Dp, D);
  } else {
    for_row_blocks(v, head_stride, nk, ahead, Hkv, group_rows, D, active,
                   [&]<int R, int NK>(const S* const* values, int64_t r, int64_t j) {
                     axpy_block<R, NK>(p + r * ld + j, ld, values, part + r * Dp, Dp, D);
                   });
  }
  merge_rows(ws.acc.data(), ws.alpha.data(), part, Hkv * group_rows, Dp);
}

// Merges the splits of every (b, h, new token) by their lse: out = sum_s w_s o_s / sum_s w_s with
// w_s = exp(lse_s - max), lse = max + log(sum w); rows no split saw a key for give zeros and -inf.
// With a map, each split's map blocks are added with the split's share of the row's softmax (a block
// straddling two splits gets both parts).
template <typename S>
void combine_splits(const at::Tensor& opart, const at::Tensor& lpart, const at::Tensor& mpart, int64_t B, int64_t H,
                    int64_t Sq, int64_t splits, int64_t chunk, int64_t map_cols, int64_t map_blocks, bool map_max,
                    at::Tensor& out, at::Tensor& lse, at::Tensor& map) {
  using T = compute_t<S>;
  const int64_t D = out.size(3), rows = H * Sq;
  const T* op = opart.data_ptr<T>();
  const T* lp = lpart.data_ptr<T>();
  const T* mp = mpart.data_ptr<T>();
  const bool with_map = map_cols > 0;
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

// Paged caches (flash_attn's block_table): k, v are (num_pages, page, Hkv, D) and sequence b's key at position
// j lives in page pages[b * max_pages + j / page], row j % page. null pages: k, v are (B, S_max, Hkv, D).
struct PageTable {
  const int32_t* pages = nullptr;
  int64_t max_pages = 0;
  bool present() const { return pages != nullptr; }
};

template <typename S>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* seqlens,
                   const int32_t* leftpad, const BlockKeep& keep, const PageTable& paged, double softmax_scale,
                   int64_t left, int64_t num_splits, const ScoreMods<compute_t<S>>& mods, at::Tensor& out,
                   at::Tensor& lse, int64_t map_cols, bool map_max, at::Tensor& map) {
  using T = compute_t<S>;
  constexpr int64_t NR = kGemmN<T>;
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  // the logical cache length; paged, a page is k.size(1) rows
  const int64_t page = k.size(1), Smax = paged.present() ? paged.max_pages * page : k.size(1);
  const int64_t Hkv = k.size(2), G = H / Hkv;
  const int64_t group_rows = G * Sq, rows = H * Sq;  // row r = h * Sq + i
  const int64_t Dp = round_up(D, NR);
  const T c = static_cast<T>(softmax_scale * kLog2e);

  std::vector<int64_t> lens(B), starts(B, 0);  // sequence b's keys: [starts[b], lens[b])
  int64_t maxlen = 0;
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = std::clamp<int64_t>(seqlens[b], 0, Smax);
    if (leftpad != nullptr) starts[b] = std::clamp<int64_t>(leftpad[b], 0, lens[b]);
    maxlen = std::max(maxlen, lens[b]);
  }
  // A tile never straddles two mask key blocks (splits are whole tiles). Paged, where pages do not hold whole tiles
  // (`across`), a tile spans pages, each key row read in its own page (TileRows), except for the bf16 products, which
  // read a tile's K as one matrix and V as row pairs: their tiles are gathered from the pages into scratch first.
  // Measured on 16-row pages (vLLM's; README, 2026-12-07): in place, paged MQA decoding ran at 1.03-1.27x the
  // contiguous cache's time where the gathered tiles took 1.2-1.44x; GQA (4 rows a group) at 1.02-1.27x where tiles
  // shrunk to the page (16 keys) took 1.2-1.5x; MHA alike either way (1.1-1.3x).
  const int64_t tile = keep.present() ? std::min(keep.block_k, kMaxTile) : kTileKeys;
  const bool across = paged.present() && page % tile != 0;
  const int64_t stile = std::max(tile, kTileKeys);
  int64_t splits = num_splits;
  if (splits <= 0 && deterministic_schedule()) {  // from the length alone: the same at any thread count
    splits = std::clamp<int64_t>(maxlen / kDeterministicSplitKeys, 1, kDeterministicSplits);
  } else if (splits <= 0) {  // enough tasks for the threads, splits of at least kMinSplitKeys keys
    const int64_t threads = at::get_num_threads();
    splits = std::min((2 * threads + B - 1) / B, std::max<int64_t>(1, maxlen / kMinSplitKeys));
  }
  splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, (maxlen + tile - 1) / tile));
  const int64_t chunk = round_up((maxlen + splits - 1) / splits, tile);
  // bf16 products (see the top): the cache's K rows are read as words, so D, the strides and the address are even
  const bool dot = kDotFor<S> && bf16_dot() && group_rows > 16 && D % 2 == 0 && k.stride(1) % 2 == 0 &&
                   k.stride(2) % 2 == 0 && k.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(k.data_ptr()) % 4 == 0;
  const int64_t D2 = D / 2, dot_cols = dot ? round_up(group_rows, NR) : 0, dot_words = dot_cols * D2;
  const bool brgemm = dot && bf16_brgemm();  // the amx level: the same products through oneDNN's brgemm

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
  const int64_t sk_b = k.stride(0), sv_b = v.stride(0);  // the position and head strides: per tile (gathered ones)

  // One task per (batch, split): all heads together, so the cache is read front to back.
  run_tasks(
      B * splits,
      [&](int64_t t) {
        const int64_t b = t / splits, s0 = std::max((t % splits) * chunk, starts[b]);
        return std::max<int64_t>(0, std::min((t % splits + 1) * chunk, lens[b]) - s0);
      },
      [&] {
        return DecodeScratch<T>(rows, Hkv, Dp, stile, map_blocks, dot_words, dot_cols,
                                across && dot ? tile * Hkv * D * static_cast<int64_t>(sizeof(S)) : 0);
      },
      [&](int64_t t, DecodeScratch<T>& ws) {
        const int64_t b = t / splits, split = t % splits;
        // a left-padded sequence's tiles before its first key are skipped whole (tile-aligned: mask blocks)
        const int64_t seqlen = lens[b], s1 = std::min((split + 1) * chunk, seqlen);
        const int64_t s0 = std::max(split * chunk, starts[b] / tile * tile);
        for (int64_t h = 0; h < H && !dot; ++h)
          for (int64_t i = 0; i < Sq; ++i)
            load_row(qp + b * sq_b + i * sq_s + h * sq_h, D, c, ws.q.data() + (h * Sq + i) * Dp, Dp);
        if (dot) {  // q^T of each group as bf16 pairs, unscaled (c multiplies the float scores); padding rows zero
          if constexpr (kDotFor<S>) {
            std::fill(ws.qt2.begin(), ws.qt2.end(), uint32_t(0));
            for (int64_t r = 0; r < rows; ++r) {
              const S* qrow = qp + b * sq_b + (r % Sq) * sq_s + (r / Sq) * sq_h;
              const int64_t g = r % group_rows;
              uint32_t* panel = ws.qt2.data() + r / group_rows * dot_words + g / NR * D2 * NR + g % NR;
              for (int64_t d2 = 0; d2 < D2; ++d2) panel[d2 * NR] = bf16_pair(qrow[2 * d2].x, qrow[2 * d2 + 1].x);
            }
          }
        }
        const int64_t first_block = with_map ? split * chunk / map_cols : 0;  // combine_splits reads from there
        // the first cache row of logical position t0 (paged: in its page; the rows after it in the page follow at
        // the position stride)
        auto tile_row = [&](const S* base, int64_t s_b, int64_t s_s, int64_t t0) -> const S* {
          if (!paged.present()) return base + b * s_b + t0 * s_s;
          return base + paged.pages[b * paged.max_pages + t0 / page] * s_b + (t0 % page) * s_s;
        };
        // keys the grouped paths may request ahead of a tile: to the split's end, or the page's
        auto ahead_of = [&](int64_t t0, int64_t s1) {
          return paged.present() ? std::min(s1, (t0 / page + 1) * page) - t0 : s1 - t0;
        };
        // a tile's rows [t0, t1) copied page run by page run into dst, (t1 - t0, Hkv, D) contiguous
        auto gather_rows = [&](const S* base, int64_t s_b, int64_t s_s, int64_t s_h, int64_t t0, int64_t t1, S* dst) {
          for (int64_t j0 = t0, j1; j0 < t1; j0 = j1) {
            j1 = std::min(t1, (j0 / page + 1) * page);
            const S* src = tile_row(base, s_b, s_s, j0);
            if (s_h == D && s_s == Hkv * D) {  // whole rows of the page, one copy
              std::memcpy(dst + (j0 - t0) * Hkv * D, src, (j1 - j0) * Hkv * D * sizeof(S));
            } else {
              for (int64_t j = j0; j < j1; ++j)
                for (int64_t hk = 0; hk < Hkv; ++hk)
                  std::memcpy(dst + ((j - t0) * Hkv + hk) * D, src + (j - j0) * s_s + hk * s_h, D * sizeof(S));
            }
          }
        };
        // exact: P V row by row over each row's own keys, run only when the fast pass left a non-finite
        // accumulator (NaN/Inf in V, where 0 * NaN would reach rows that do not attend the key).
        auto run = [&](bool exact) {
        std::fill(ws.m.begin(), ws.m.end(), -std::numeric_limits<T>::infinity());
        std::fill(ws.l.begin(), ws.l.end(), T(0));
        std::fill(ws.acc.begin(), ws.acc.end(), T(0));
        std::fill(ws.part.begin(), ws.part.end(), T(0));
        if (with_map) std::fill(ws.map_ref.begin(), ws.map_ref.end(), -std::numeric_limits<T>::infinity());
        auto map_rows = [&](int64_t r0, int64_t r1, int64_t t0) {
          if (!with_map) return;
          for (int64_t r = r0; r < r1; ++r)
            accumulate_map_row(ws.s.data() + r * stile, ws.spans[r], t0, map_cols, first_block, ws.m[r], map_max,
                               ws.map_val.data() + r * map_blocks, ws.map_ref.data() + r * map_blocks);
        };
        for (int64_t t0 = s0, t1; t0 < s1; t0 = t1) {
          t1 = std::min(t0 + tile, s1);
          const int64_t nk = t1 - t0, n = round_up(nk, NR);
          bool any = false;
          for (int64_t h = 0; h < H; ++h) {
            const bool kept = !keep.present();
            for (int64_t i = 0; i < Sq; ++i) {
              const int64_t r = h * Sq + i, pos = seqlen - Sq + i;
              const int64_t lo = std::max(starts[b], left >= 0 ? pos - left : 0);
              int64_t hi = std::min(seqlen, pos + 1);
              if (!kept && !keep.kept(b, h, i / keep.block_q, t0 / keep.block_k)) hi = lo;
              ws.spans[r] = {std::max(lo, t0) - t0, std::min(hi, t1) - t0};
              any |= !ws.spans[r].empty();
            }
          }
          if (!any) continue;
          // the tile's K and V rows: in place (one page, no pages, or row by row across pages), or gathered (the
          // bf16 products' tiles across pages)
          int64_t ahead, sk_s = k.stride(1), sk_h = k.stride(2), sv_s = v.stride(1), sv_h = v.stride(2);
          TileRows<S> krows{nullptr, sk_s}, vrows{nullptr, sv_s};
          const bool spans = across && t0 / page != (t1 - 1) / page;
          if (spans && dot) {
            S* kg = reinterpret_cast<S*>(ws.kgather.data());
            S* vg = reinterpret_cast<S*>(ws.vgather.data());
            gather_rows(kp, sk_b, sk_s, sk_h, t0, t1, kg);
            gather_rows(vp, sv_b, sv_s, sv_h, t0, t1, vg);
            sk_s = sv_s = Hkv * D, sk_h = sv_h = D;
            krows = {kg, sk_s}, vrows = {vg, sv_s}, ahead = nk;
          } else if (spans) {
            const int32_t* table = paged.pages + b * paged.max_pages + t0 / page;
            krows = {kp, sk_s, table, page, t0 % page, sk_b}, vrows = {vp, sv_s, table, page, t0 % page, sv_b};
            ahead = nk;
          } else {
            krows = {tile_row(kp, sk_b, sk_s, t0), sk_s}, vrows = {tile_row(vp, sv_b, sv_s, t0), sv_s};
            ahead = ahead_of(t0, s1);
          }
          const S* ktile = krows.base;  // the bf16 products' tile (never one across pages: gathered)
          const S* vtile = vrows.base;
          for (int64_t hk = 0; hk < Hkv; ++hk) {
            ws.active[hk] = 0;
            for (int64_t r = hk * group_rows; r < (hk + 1) * group_rows; ++r) ws.active[hk] |= !ws.spans[r].empty();
          }
          if (dot) {
            if constexpr (kDotFor<S>) {
              for (int64_t hk = 0; hk < Hkv; ++hk) {
                if (!ws.active[hk]) continue;
                const auto* krows = reinterpret_cast<const uint32_t*>(ktile + hk * sk_h);
                T* st = ws.st.data();
                gemm_bf16_via(brgemm, nk, dot_cols, D2, krows, sk_s / 2, ws.qt2.data() + hk * dot_words, D2 * NR, st,
                              dot_cols, false, nullptr, static_cast<float>(c));
                T* srows = ws.s.data() + hk * group_rows * stile;
                for (int64_t j = 0; j < nk; ++j)
                  for (int64_t g = 0; g < group_rows; ++g) srows[g * stile + j] = st[j * dot_cols + g];
              }
            }
          } else {
            tile_scores(krows, sk_h, nk, ahead, Hkv, group_rows, D, Dp, ws.active.data(), ws,
                        stile);
          }
          if (mods.on_scores())
            for (int64_t r = 0; r < rows; ++r)
              if (!ws.spans[r].empty())  // row r: head r / Sq at position seqlen - Sq + r % Sq
                mods.apply(ws.s.data() + r * stile, n, mods.slope2(b, r / Sq),
                           static_cast<T>(seqlen - Sq + r % Sq - t0));
          softmax_rows(ws.s.data(), stile, rows, n, ws.spans.data(), ws.m.data(), ws.l.data(), ws.alpha.data());
          map_rows(0, rows, t0);
          if (exact) {
            rescale_rows(ws.acc.data(), ws.alpha.data(), rows, Dp);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = ws.spans[r].v0; j < ws.spans[r].v1; ++j)
                axpy(ws.s[r * stile + j], vrows(j) + (r / group_rows) * sv_h, ws.acc.data() + r * Dp, D);
            continue;
          }
          if (group_rows <= kRowBlock) {
            tile_accumulate(vrows, sv_h, nk, ahead, Hkv, group_rows, D, Dp, ws.active.data(), ws,
                            stile);
            continue;
          }
          for (int64_t hk = 0; hk < Hkv; ++hk) {  // many rows per group: a V panel in L1 and the micro-kernel
            if (!ws.active[hk]) continue;
            const int64_t r0 = hk * group_rows;
            if (dot) {  // P rounded to bf16 pairs along the keys, V as row pairs (zero past the tile's keys)
              if constexpr (kDotFor<S>) {
                const int64_t nk2 = (nk + 1) / 2;
                pack_row_pairs<NR>(vtile + hk * sv_h, sv_s, 0, nk, nk, D, Dp, ws.vpair.data());
                for (int64_t r = r0; r < r0 + group_rows; ++r)
                  to_bf16_pairs(ws.s.data() + r * stile, nk, ws.p2.data() + r * (stile / 2));
                gemm_bf16_via(brgemm, group_rows, Dp, nk2, ws.p2.data() + r0 * (stile / 2), stile / 2,
                              ws.vpair.data(), nk2 * NR, ws.acc.data() + r0 * Dp, Dp, true, ws.alpha.data() + r0);
              }
              continue;
            }
            pack_row_panels_at<NR>([&](int64_t j) { return vrows(j) + hk * sv_h; }, 0, nk, D, Dp, stile, T(1),
                                   ws.vpanel.data());
            gemm<T>(group_rows, Dp, nk, ws.s.data() + r0 * stile, stile, ws.vpanel.data(), stile * NR,
                    ws.acc.data() + r0 * Dp, Dp, true, ws.alpha.data() + r0);
          }
        }
        };
        run(false);
        if (!all_finite(ws.acc.data(), rows * Dp)) run(true);
        if (brgemm) at::native::cpublas::brgemm_release();
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

  combine_splits<S>(opart, lpart, mpart, B, H, Sq, splits, chunk, map_cols, map_blocks, map_max, out, lse, map);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attn_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_keep, int64_t block_q, int64_t block_k, double softmax_scale,
    int64_t window_left, int64_t num_splits, int64_t map_cols, bool map_max, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& cache_leftpad) {
  constexpr const char* op = "decode_attn_fwd";
  const int64_t Smax = check_decode_args(op, q_in, k_in, v_in, block_keep, block_q, block_k, softmax_scale,
                                         window_left, num_splits, map_cols, block_table);
  check_score_mod_args(op, q_in, softcap, alibi_slopes, c10::nullopt);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor lens = checked_lengths(op, "cache_seqlens", cache_seqlens, q.size(0), Smax);
  at::Tensor starts;  // flash_attn's cache_leftpad: the keys before it are padding
  if (cache_leftpad.has_value() && cache_leftpad->defined())
    starts = checked_lengths(op, "cache_leftpad", *cache_leftpad, q.size(0), Smax);
  PageTable paged;
  at::Tensor pages;
  if (block_table.has_value() && block_table->defined()) {
    pages = block_table->contiguous();
    check_pages_in_use(op, pages, lens, k.size(1), k.size(0));  // an index out of range would read past the cache
    paged = {pages.data_ptr<int32_t>(), pages.size(1)};
  }
  window_left = std::min(window_left, Smax);  // wider than the cache: unbounded (and no overflow)
  BlockKeep keep;
  at::Tensor keep_t;
  if (block_keep.has_value() && block_keep->defined()) {
    keep_t = block_keep->to(at::kByte).contiguous();
    keep = {keep_t.data_ptr<uint8_t>(), keep_t.size(0), keep_t.size(1), keep_t.size(2), keep_t.size(3), block_q,
            block_k};
  }
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = empty_output(q.sizes(), q.options());
  at::Tensor lse = empty_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype));
  // the block map per query row (B, H, Sq_new, ceil(S_max / map_cols)), pooled over query blocks in Python
  const int64_t map_nk = map_cols > 0 ? (Smax + map_cols - 1) / map_cols : 0;
  at::Tensor map = map_cols > 0 ? empty_output({q.size(0), q.size(2), q.size(1), map_nk},
                                              q.options().dtype(lse_dtype))
                                : at::empty({0}, q.options().dtype(lse_dtype));
  if (q.numel() == 0) return {out, lse, map};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attn_fwd_cpu", [&] {
    const ScoreMods<compute_t<scalar_t>> mods(softcap, alibi_slopes, c10::nullopt, q.size(2));
    decode_kernel<scalar_t>(q, k, v, lens.data_ptr<int32_t>(), starts.defined() ? starts.data_ptr<int32_t>() : nullptr,
                            keep, paged, softmax_scale, window_left, num_splits, mods, out, lse, map_cols, map_max,
                            map);
  });
  return {out, lse, map};
}

}  // namespace


}  // namespace attnops::cpu::ATTNOPS_ISA
