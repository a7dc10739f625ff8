// MoBA router on the CPU: pools the keys per MoBA block, scores every query tile against the pooled
// blocks, keeps the top-k and writes the block LUT that the block-sparse core then runs.
//
// Routing is per query tile of `route_block` rows (the kernel's query block), not per token: a
// LUT row is what the attention kernels read, and a token-granular choice would need a per-row mask
// inside them. The tile's gate against block j is mean(q[tile]) . mean(k[block j]), which ranks
// blocks as the sum of its tokens' gates does (attnops/ops/routed.py states the definition).
// The tile's own MoBA block is always kept (attended causally when causal: its key sub-blocks end at
// the tile's diagonal); under causal, later blocks are never candidates. Ties go to the lower block
// index and a NaN gate ranks highest (torch.topk's order), so the choice is deterministic.
//
// Below it, token routing's CPU helpers (attnops/ops/routed/token.py): the per-row choice
// (moba_token_select), the pair pass's row order (moba_token_pairs) and the no-autograd merge
// (moba_token_merge), each equal to the torch steps it replaces.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/vec.h"
#include "ops.h"

namespace attnops::cpu::ATTNOPS_ISA {
namespace {

template <typename T>
void route(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal,
           int64_t route_block, at::Tensor& counts, at::Tensor& indices) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  const int64_t group = H / Hkv;
  const int64_t num_moba = (S + block_size - 1) / block_size;
  const int64_t num_tiles = (S + route_block - 1) / route_block;  // query tiles = key sub-blocks
  const int64_t sub = block_size / route_block;                   // key sub-blocks per MoBA block
  const int64_t width = indices.size(3);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const auto qs = q.strides();
  const auto ks = k.strides();

  // Pooled keys (B, num_moba, Hkv, D): the mean over the block's keys (a partial last block
  // averages the keys it has).
  std::vector<acc_t> pooled(B * num_moba * Hkv * D, acc_t(0));
  at::parallel_for(0, B * num_moba * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % Hkv, j = (task / Hkv) % num_moba, b = task / (Hkv * num_moba);
      acc_t* out = pooled.data() + task * D;
      const int64_t lo = j * block_size, hi = std::min(S, lo + block_size);
      for (int64_t s = lo; s < hi; ++s) {
        const T* row = kp + b * ks[0] + s * ks[1] + hk * ks[2];
        for (int64_t d = 0; d < D; ++d) out[d] += static_cast<acc_t>(row[d]);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(hi - lo);
      for (int64_t d = 0; d < D; ++d) out[d] *= inv;
    }
  });

  int32_t* cnt = counts.data_ptr<int32_t>();
  int32_t* idx = indices.data_ptr<int32_t>();
  at::parallel_for(0, B * H * num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qmean(D), score(num_moba);
    std::vector<int64_t> cand, chosen;
    cand.reserve(num_moba);
    chosen.reserve(num_moba);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % num_tiles, h = (task / num_tiles) % H, b = task / (num_tiles * H);
      const int64_t r0 = t * route_block, r1 = std::min(S, r0 + route_block);
      std::fill(qmean.begin(), qmean.end(), acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = qp + b * qs[0] + r * qs[1] + h * qs[2];
        for (int64_t d = 0; d < D; ++d) qmean[d] += static_cast<acc_t>(row[d]);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(r1 - r0);
      for (int64_t d = 0; d < D; ++d) qmean[d] *= inv;

      const int64_t own = r0 / block_size;
      cand.clear();
      for (int64_t j = 0; j < (causal ? own : num_moba); ++j) {
        if (j == own) continue;
        const acc_t* kb = pooled.data() + ((b * num_moba + j) * Hkv + h / group) * D;
        acc_t s = 0;
        for (int64_t d = 0; d < D; ++d) s += qmean[d] * kb[d];
        score[j] = std::isnan(s) ? std::numeric_limits<acc_t>::infinity() : s;
        cand.push_back(j);
      }
      const int64_t keep = std::min<int64_t>(topk - 1, static_cast<int64_t>(cand.size()));
      const auto better = [&](int64_t a, int64_t c) { return score[a] > score[c] || (score[a] == score[c] && a < c); };
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), better);
      chosen.assign(cand.begin(), cand.begin() + keep);
      chosen.push_back(own);
      std::sort(chosen.begin(), chosen.end());

      int32_t* row_idx = idx + task * width;
      int64_t n = 0;
      for (int64_t j : chosen) {
        int64_t last = std::min((j + 1) * sub, num_tiles) - 1;
        if (causal && j == own) last = std::min(last, t);  // the diagonal sub-block of this tile
        for (int64_t s = j * sub; s <= last; ++s) row_idx[n++] = static_cast<int32_t>(s);
      }
      for (int64_t s = n; s < width; ++s) row_idx[s] = 0;
      cnt[task] = static_cast<int32_t>(n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moba_route_cpu(const at::Tensor& q_in, const at::Tensor& k_in, int64_t block_size,
                                                  int64_t topk, bool causal, int64_t route_block) {
  constexpr const char* op = "moba_route";
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, op, ": q and k must be 4-d");
  TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) && q_in.size(3) == k_in.size(3), op,
              ": q (B, S, H, D) and k (B, S, Hkv, D) do not fit: ", q_in.sizes(), ", ", k_in.sizes());
  TORCH_CHECK(k_in.size(2) >= 1 && q_in.size(2) % k_in.size(2) == 0, op, ": num_heads (", q_in.size(2),
              ") must be a multiple of num_kv_heads (", k_in.size(2), ") >= 1");
  TORCH_CHECK(is_attention_dtype(q_in.scalar_type()) && k_in.scalar_type() == q_in.scalar_type(), op,
              ": q and k must share a floating dtype, got ", q_in.scalar_type(), " and ", k_in.scalar_type());
  TORCH_CHECK(q_in.device() == k_in.device(), op, ": q and k must be on one device");
  TORCH_CHECK(route_block > 0 && block_size > 0 && block_size % route_block == 0 && topk >= 1, op,
              ": block_size must be a positive multiple of route_block, topk >= 1");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const int64_t S = q.size(1);
  const int64_t num_tiles = (S + route_block - 1) / route_block;
  const int64_t num_moba = (S + block_size - 1) / block_size;
  const int64_t width = std::max<int64_t>(1, std::min(std::min(topk, num_moba) * (block_size / route_block), num_tiles));
  auto opts = q.options().dtype(at::kInt);
  at::Tensor counts = empty_output({q.size(0), q.size(2), num_tiles}, opts);
  at::Tensor indices = empty_output({q.size(0), q.size(2), num_tiles, width}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moba_route", [&] {
    route<scalar_t>(q, k, block_size, topk, causal, route_block, counts, indices);
  });
  return {counts, indices};
}

// Token routing's selection (attnops/ops/routed/token.py): gate (H, L, n) float32, each row's q . block means
// (unmasked) -> sel (H, L, width) int32, each row's chosen blocks other than its own (the own block is attended by
// the self pass), -1 after them, and fallback (H, L) bool. A row picks the m = min(topk, n) - 1 largest candidates:
// under causal the blocks before its own (later ones are fillers that torch.topk may pick and the caller drops),
// else every other block. Which of two equal values torch.topk returns is its implementation's, so a row whose
// m-th largest candidate ties an unchosen one, or that holds a non-finite candidate (NaN ranks above the own
// block's +inf there), is flagged instead of chosen; the caller routes those rows by torch.topk itself, and the
// selection stays exactly the official one.
constexpr int64_t kSmallTopk = 8;

// The choice for W rows at once, lane i = row i (rows `n` floats apart from g, own and stop per lane as
// moba_token_select_cpu defines them; a lane with no candidates chooses nothing and is flagged): the rows' gates go
// through the register transpose in W x W blocks, and every candidate block is then one vector step of a
// compare-exchange chain over the lanes' m largest values and their blocks. A row at a time, the lanes' horizontal
// reductions (dependent shuffle chains), the scalar scan for the blocks at or above the threshold and its branches
// took ~340 cycles at topk 3 over 64 blocks (Xeon); here a row costs its share of the transposes and the chain.
// -> idx[0, m): each lane's chosen blocks, ascending; the flagged lanes: a non-finite candidate, or a candidate left
// out that equals the m-th largest (more than m reach the threshold), which the caller leaves to torch.topk.
using VecF = vec_t<float>;
using VecI = typename Vec<float>::itype;

inline VecI lanes_top(const float* g, int64_t n, VecI own, VecI stop, int64_t cols, int64_t m, VecI* idx) {
  constexpr int kW = Vec<float>::size;
  const VecF ninf = vsplat<float>(-std::numeric_limits<float>::infinity()), zero = vsplat<float>(0.0f);
  VecF top[kSmallTopk];
  for (int64_t i = 0; i < m; ++i) {
    top[i] = ninf;
    idx[i] = own - own - 1;
  }
  VecF dropped = ninf;  // the largest value the chain has let go
  VecI bad = own - own;
  for (int64_t c0 = 0; c0 < cols; c0 += kW) {
    VecF x[kW];
    for (int r = 0; r < kW; ++r) {
      if (c0 + kW <= n) {
        x[r] = vload(g + r * n + c0);
      } else {
        x[r] = zero;
        std::memcpy(&x[r], g + r * n + c0, (n - c0) * sizeof(float));
      }
    }
    transpose_square<float>(x);  // x[j]: column c0 + j of the W rows
    for (int64_t j = 0; j < kW && c0 + j < cols; ++j) {
      VecI c = own - own + static_cast<int32_t>(c0 + j);
      const VecI valid = (c < stop) & (c != own);
      VecF v = x[j];
      bad |= valid & ((v - v) != zero);  // v - v is NaN for NaN and +-inf
      v = valid ? v : ninf;
      for (int64_t i = 0; i < m; ++i) {  // ties keep the earlier block in the chain: the set is what counts
        const VecI keep = top[i] >= v;
        const VecF hi = keep ? top[i] : v;
        const VecI hi_at = keep ? idx[i] : c;
        v = keep ? v : top[i];
        c = keep ? c : idx[i];
        top[i] = hi;
        idx[i] = hi_at;
      }
      dropped = dropped >= v ? dropped : v;
    }
  }
  for (int64_t a = 0; a < m; ++a)  // ascending blocks, as the per-row form writes them
    for (int64_t b = a + 1; b < m; ++b) {
      const VecI swap = idx[b] < idx[a];
      const VecI lo = swap ? idx[b] : idx[a];
      idx[b] = swap ? idx[a] : idx[b];
      idx[a] = lo;
    }
  return bad | (dropped == top[m - 1]);
}

std::tuple<at::Tensor, at::Tensor> moba_token_select_cpu(const at::Tensor& gate_in, int64_t block_size, int64_t topk,
                                                         bool causal, int64_t width) {
  constexpr const char* op = "moba_token_select";
  TORCH_CHECK(gate_in.dim() == 3 && gate_in.scalar_type() == at::kFloat, op, ": gate must be (H, L, n) float32");
  const at::Tensor gate = gate_in.contiguous();
  const int64_t H = gate.size(0), L = gate.size(1), n = gate.size(2);
  TORCH_CHECK(block_size > 0 && n == (L + block_size - 1) / block_size, op, ": gate has ", n, " blocks for ", L,
              " rows of blocks of ", block_size);
  const int64_t m = std::min(topk, n) - 1;
  TORCH_CHECK(topk >= 2 && width >= m, op, ": needs topk >= 2 and width >= min(topk, blocks) - 1");
  at::Tensor sel = at::empty({H, L, width}, gate.options().dtype(at::kInt));
  at::Tensor fallback = at::empty({H, L}, gate.options().dtype(at::kBool));
  const float* gp = gate.data_ptr<float>();
  int32_t* sp = sel.data_ptr<int32_t>();
  bool* fp = fallback.data_ptr<bool>();
  at::parallel_for(0, H * L, 1024, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int32_t>> cand(n);
    auto one_row = [&](int64_t row) {
      const float* g = gp + row * n;
      int32_t* out = sp + row * width;
      std::fill(out, out + width, -1);
      const int64_t own = (row % L) / block_size, stop = causal ? own : n;
      // The candidates are [0, own) and [own + 1, stop): every pass below walks them through this one function,
      // as two branch-free ranges (so the finite check and the tie count vectorise).
      const int64_t hi0 = std::min(own, stop), lo1 = std::min(own + 1, stop), count = hi0 + (stop - lo1);
      auto each_candidate = [&](auto&& f) {
        for (int64_t c = 0; c < hi0; ++c) f(c);
        for (int64_t c = lo1; c < stop; ++c) f(c);
      };
      bool finite = true;
      each_candidate([&](int64_t c) { finite &= std::isfinite(g[c]); });
      fp[row] = !finite;
      if (!finite) return;
      if (count <= m) {  // every candidate is chosen (the rest of torch.topk's picks are fillers)
        int64_t i = 0;
        each_candidate([&](int64_t c) { out[i++] = static_cast<int32_t>(c); });
        return;
      }
      if (m == 0) return;
      // m > kSmallTopk: a selection algorithm
      int64_t next = 0;
      each_candidate([&](int64_t c) { cand[next++] = {g[c], static_cast<int32_t>(c)}; });
      auto larger = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
        return a.first > b.first;
      };
      std::nth_element(cand.begin(), cand.begin() + (m - 1), cand.begin() + count, larger);
      const float threshold = cand[m - 1].first;
      // exactly m candidates reach the threshold, or torch.topk's own order decides between equal ones
      int64_t reach = 0;
      each_candidate([&](int64_t c) { reach += g[c] >= threshold; });
      if (reach != m) {
        fp[row] = true;
        return;
      }
      for (int64_t i = 0; i < m; ++i) out[i] = cand[i].second;
    };
    constexpr int kW = Vec<float>::size;
    std::vector<float> tail;  // a range's last rows, padded with empty lanes to W
    for (int64_t row = begin; row < end; row += kW) {
      // MoBA's usual top-2..9 goes W rows at a time; a row with m or fewer candidates (a causal sequence's first
      // blocks) and other topk go one by one
      const int64_t rows = std::min<int64_t>(kW, end - row);
      VecI own = {}, stop = {};
      bool lanes[kW] = {};
      int64_t cols = 0;
      for (int64_t i = 0; i < rows; ++i) {
        own[i] = static_cast<int32_t>(((row + i) % L) / block_size);
        stop[i] = causal ? own[i] : static_cast<int32_t>(n);
        cols = std::max<int64_t>(cols, stop[i]);
        lanes[i] = m >= 1 && m <= kSmallTopk && (causal ? own[i] : n - 1) > m;  // candidates: [0, stop) but own
      }
      VecI idx[kSmallTopk], flag = {};
      if (std::any_of(lanes, lanes + rows, [](bool x) { return x; })) {
        const float* g = gp + row * n;
        if (rows < kW) {
          tail.assign(kW * n, 0.0f);
          std::copy(g, g + rows * n, tail.begin());
          g = tail.data();
        }
        flag = lanes_top(g, n, own, stop, cols, m, idx);
      }
      for (int64_t i = 0; i < rows; ++i) {
        if (!lanes[i]) {
          one_row(row + i);
          continue;
        }
        int32_t* out = sp + (row + i) * width;
        std::fill(out, out + width, -1);
        fp[row + i] = flag[i] != 0;
        if (!fp[row + i])
          for (int64_t k = 0; k < m; ++k) out[k] = idx[k][i];
      }
    }
  });
  return {sel, fallback};
}

// Token routing's pair order (attnops/ops/routed/token.py, `_pair_pass`): chosen (H, T, W) int32, each (head,
// token)'s chosen blocks (indices into block_start / block_end, -1 entries skipped), -> the pair pass's rows, kv head
// by kv head (heads h with h / group = kv head), ordered by block and, within a block, by (head, token):
// row (Hkv, width) int64 = t * H + h and bounds (Hkv, width, 2) int32 = the block's key range; width is the largest
// kv head's pair count, the others padded with row 0 and the empty range [T, T). Ordered by block, both bound
// columns are nondecreasing along a kv head's rows (as the core requires) when the blocks' ranges are. A counting
// sort: the stable argsort of the torch form (`_order_pairs`) gives the same order.
std::tuple<at::Tensor, at::Tensor> moba_token_pairs_cpu(const at::Tensor& chosen_in, const at::Tensor& block_start_in,
                                                        const at::Tensor& block_end_in, int64_t group) {
  constexpr const char* op = "moba_token_pairs";
  TORCH_CHECK(chosen_in.dim() == 3 && chosen_in.scalar_type() == at::kInt, op, ": chosen must be (H, T, W) int32");
  TORCH_CHECK(block_start_in.dim() == 1 && block_end_in.dim() == 1 && block_start_in.scalar_type() == at::kLong &&
                  block_end_in.scalar_type() == at::kLong && block_start_in.size(0) == block_end_in.size(0),
              op, ": block_start and block_end must be (C,) int64");
  const int64_t H = chosen_in.size(0), T = chosen_in.size(1), W = chosen_in.size(2), C = block_start_in.size(0);
  TORCH_CHECK(group >= 1 && H % group == 0, op, ": the heads (", H, ") must be a multiple of group (", group, ")");
  TORCH_CHECK(T < std::numeric_limits<int32_t>::max(), op, ": ", T, " tokens do not fit int32 bounds");
  const at::Tensor chosen = chosen_in.contiguous(), starts = block_start_in.contiguous(),
                   ends = block_end_in.contiguous();
  const int32_t* cp = chosen.data_ptr<int32_t>();
  const int64_t *bs = starts.data_ptr<int64_t>(), *be = ends.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(0 <= bs[c] && bs[c] <= be[c] && be[c] <= T && (c == 0 || (bs[c - 1] <= bs[c] && be[c - 1] <= be[c])),
                op, ": block ", c, "'s key range [", bs[c], ", ", be[c], ") is not within [0, ", T,
                ") and ordered after the previous block's");
  const int64_t Hkv = H / group, per_kv = group * T * W;  // a kv head's entries are contiguous in chosen
  // offset[hk * (C + 1) + c]: first slot of block c among kv head hk's rows (a count, then a prefix sum)
  std::vector<int64_t> offset(Hkv * (C + 1), 0);
  for (int64_t hk = 0; hk < Hkv; ++hk) {
    int64_t* off = offset.data() + hk * (C + 1);
    for (const int32_t* e = cp + hk * per_kv; e < cp + (hk + 1) * per_kv; ++e) {
      TORCH_CHECK(*e < C, op, ": chosen block ", *e, " is not below the ", C, " blocks");
      if (*e >= 0) ++off[*e + 1];
    }
    for (int64_t c = 0; c < C; ++c) off[c + 1] += off[c];
  }
  int64_t width = 0;
  for (int64_t hk = 0; hk < Hkv; ++hk) width = std::max(width, offset[hk * (C + 1) + C]);
  at::Tensor row = at::zeros({Hkv, width}, chosen.options().dtype(at::kLong));
  at::Tensor bounds = at::full({Hkv, width, 2}, T, chosen.options());
  int64_t* rp = row.data_ptr<int64_t>();
  int32_t* bp = bounds.data_ptr<int32_t>();
  at::parallel_for(0, Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t hk = begin; hk < end; ++hk) {
      int64_t* next = offset.data() + hk * (C + 1);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t t = 0; t < T; ++t)
          for (const int32_t* e = cp + (h * T + t) * W; e < cp + (h * T + t + 1) * W; ++e) {
            if (*e < 0) continue;
            const int64_t slot = hk * width + next[*e]++;
            rp[slot] = t * H + h;
            bp[2 * slot] = static_cast<int32_t>(bs[*e]);
            bp[2 * slot + 1] = static_cast<int32_t>(be[*e]);
          }
    }
  });
  return {row, bounds};
}

// Token routing's merge without autograd (attnops/ops/routed/token.py, `_merge_into`), in place on out (T, H, Dv)
// (float or double): the rows (t, head_start + h), h < heads, become out * own[t * heads + h], then every pair p adds
// out_pair[p] * scale[p] (in out's type) to its row row[p] = t * heads + h, pairs in their order. These are torch's
// steps, mul_ then index_add_ of the scaled pairs, which the autograd path runs: the same roundings in the same
// order (no fused multiply-add), so both paths give equal outputs bit for bit. One pass instead of three (scale,
// scale, scatter); index_add_ also radix-sorts its index first.
// Threads own ranges of rows; each lists its rows' pairs (a count, a prefix sum and a fill over the pair list, in
// the pairs' order) and then merges row by row, its pairs read where they are: each output row is read and written
// once. Sweeping the pairs in their order instead (by block) read and wrote a float copy of the thread's rows (8 MiB
// at 32K tokens and two heads, out of cache) once per pair.
// An out of a reduced type (bf16, fp16; own and scale float32) holds the self pass's output as it came: a row is
// widened, merged in float32 as above and rounded once, which is the float32 merge followed by the cast to the
// input's type, without two full-size copies.
template <typename W, typename O, typename S>
__attribute__((optimize("fp-contract=off"))) void merge_pairs(O* out, int64_t T, int64_t H, int64_t Dv,
                                                              const W* own, const S* pair, const W* scale,
                                                              const int64_t* row, int64_t P, int64_t h0, int64_t Hg) {
  at::parallel_for(0, T * Hg, T * Hg * Dv < (1 << 16) ? T * Hg : 4096, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> first(end - begin + 1, 0);  // row r's pairs: list[first[r - begin], first[r - begin + 1])
    for (int64_t p = 0; p < P; ++p)
      if (row[p] >= begin && row[p] < end) ++first[row[p] - begin + 1];
    for (int64_t r = begin; r < end; ++r) first[r - begin + 1] += first[r - begin];
    std::vector<int64_t> list(first[end - begin]), next(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < P; ++p)
      if (row[p] >= begin && row[p] < end) list[next[row[p] - begin]++] = p;
    std::vector<W> acc(Dv);
    W* a = acc.data();
    // rows ahead: a row's pairs lie anywhere in the pair pass's output (latency-bound reads), and a group's rows of
    // out are its heads' slices of every token (Hg Dv of each H Dv), which the hardware prefetchers do not follow
    // (at 32K tokens, H = 8 in groups of two heads: the merge 20.8 -> 15.7 ms a call with out's rows prefetched)
    constexpr int64_t kAhead = 8;
    auto out_row = [&](int64_t r) { return out + ((r / Hg) * H + h0 + r % Hg) * Dv; };
    for (int64_t r = begin; r < end; ++r) {
      if (r + kAhead < end) {
        for (int64_t i = first[r + kAhead - begin]; i < first[r + kAhead - begin + 1]; ++i)
          for (int64_t byte = 0; byte < Dv * int64_t(sizeof(S)); byte += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(pair + list[i] * Dv) + byte);
        for (int64_t byte = 0; byte < Dv * int64_t(sizeof(O)); byte += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(out_row(r + kAhead)) + byte, /*rw=*/1);
      }
      O* o = out_row(r);
      const W w = own[r];
      for (int64_t d = 0; d < Dv; ++d) a[d] = static_cast<W>(o[d]) * w;
      for (int64_t i = first[r - begin]; i < first[r - begin + 1]; ++i) {
        const S* x = pair + list[i] * Dv;
        const W sc = scale[list[i]];
        for (int64_t d = 0; d < Dv; ++d) {
          const W c = static_cast<W>(x[d]) * sc;
          a[d] = a[d] + c;
        }
      }
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<O>(a[d]);
    }
  });
}

void moba_token_merge_cpu(at::Tensor& out, const at::Tensor& own, const at::Tensor& out_pair,
                          const at::Tensor& scale, const at::Tensor& row, int64_t head_start, int64_t heads) {
  constexpr const char* op = "moba_token_merge";
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && is_attention_dtype(out.scalar_type()), op,
              ": out must be a contiguous (T, H, Dv) float32, float64, bfloat16 or float16 tensor");
  // the merge's own type: out's, float32 for a reduced out
  const at::ScalarType work = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t T = out.size(0), H = out.size(1), Dv = out.size(2);
  TORCH_CHECK(heads >= 1 && head_start >= 0 && head_start + heads <= H, op, ": heads [", head_start, ", ",
              head_start + heads, ") are not within out's ", H);
  TORCH_CHECK(own.dim() == 1 && own.size(0) == T * heads && own.scalar_type() == work, op,
              ": own must be (T * heads,) ", work, " (out's dtype, float32 for a bfloat16 or float16 out)");
  TORCH_CHECK(out_pair.dim() == 2 && out_pair.size(1) == Dv && is_attention_dtype(out_pair.scalar_type()), op,
              ": out_pair must be (P, Dv) floating");
  const int64_t P = out_pair.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == P && scale.scalar_type() == work, op, ": scale must be (P,) ", work);
  TORCH_CHECK(row.dim() == 1 && row.size(0) == P && row.scalar_type() == at::kLong, op, ": row must be (P,) int64");
  const at::Tensor own_c = own.contiguous(), pair_c = out_pair.contiguous(), scale_c = scale.contiguous(),
                   row_c = row.contiguous();
  const int64_t* rp = row_c.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(0 <= rp[p] && rp[p] < T * heads, op, ": row ", rp[p], " of pair ", p, " is not within [0, ", T * heads,
                ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "moba_token_merge", [&] {
    using O = scalar_t;
    using W = at::opmath_type<O>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pair_c.scalar_type(), "moba_token_merge", [&] {
      merge_pairs<W, O, scalar_t>(out.data_ptr<O>(), T, H, Dv, own_c.data_ptr<W>(), pair_c.data_ptr<scalar_t>(),
                                  scale_c.data_ptr<W>(), rp, P, head_start, heads);
    });
  });
}

}  // namespace


}  // namespace attnops::cpu::ATTNOPS_ISA
