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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

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
  at::Tensor counts = maybe_poison(at::empty({q.size(0), q.size(2), num_tiles}, opts));
  at::Tensor indices = maybe_poison(at::empty({q.size(0), q.size(2), num_tiles, width}, opts));
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
    for (int64_t row = begin; row < end; ++row) {
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
      if (!finite) continue;
      if (count <= m) {  // every candidate is chosen (the rest of torch.topk's picks are fillers)
        int64_t i = 0;
        each_candidate([&](int64_t c) { out[i++] = static_cast<int32_t>(c); });
        continue;
      }
      if (m == 0) continue;
      float threshold;  // the m-th largest candidate
      if (m <= kSmallTopk) {  // MoBA's usual top-2..8: a sorted insertion beats a selection algorithm
        int64_t kept = 0;  // cand[0, kept): the largest so far, descending; equal values keep their index order
        each_candidate([&](int64_t c) {
          const float x = g[c];
          if (kept == m && x <= cand[m - 1].first) return;  // the common case after the first few candidates
          int64_t at = std::min(kept, m - 1);
          while (at > 0 && cand[at - 1].first < x) {
            cand[at] = cand[at - 1];
            --at;
          }
          cand[at] = {x, static_cast<int32_t>(c)};
          kept = std::min(kept + 1, m);
        });
        threshold = cand[m - 1].first;
      } else {
        int64_t i = 0;
        each_candidate([&](int64_t c) { cand[i++] = {g[c], static_cast<int32_t>(c)}; });
        auto larger = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
          return a.first > b.first;
        };
        std::nth_element(cand.begin(), cand.begin() + (m - 1), cand.begin() + count, larger);
        threshold = cand[m - 1].first;
      }
      // exactly m candidates reach the threshold, or torch.topk's own order decides between equal ones
      int64_t reach = 0;
      each_candidate([&](int64_t c) { reach += g[c] >= threshold; });
      if (reach != m) {
        fp[row] = true;
        continue;
      }
      for (int64_t i = 0; i < m; ++i) out[i] = cand[i].second;
    }
  });
  return {sel, fallback};
}

}  // namespace


}  // namespace attnops::cpu::ATTNOPS_ISA
