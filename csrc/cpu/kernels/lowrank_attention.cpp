// Low-rank-key attention (Loki) on the CPU: approximate scores from the first R components of the
// rotated queries and keys, the top-k keys per query, then exact softmax attention over them.
//
// Memory traffic is the point (decode is memory-bound): the scores read R of the D dims of each
// key, and the exact pass reads only the chosen K/V rows, so at R = D/4 and topk = N/8 a decoding
// step reads a quarter of the bytes of dense attention (MHA). Two phases per pass of queries:
//   1. scores: a task per (batch, chunk of keys) reads the low-rank key rows front to back, every
//      kv head, and dots each with all the query rows of its group (a task per kv head read rows
//      Hkv * D apart: page-sized strides that defeat the prefetcher, as in the decode kernel);
//   2. selection + attention: a task per (batch, query, head) finds the k-th largest score with
//      nth_element, collects the chosen keys in ascending order, and attends to them exactly.
// The score buffer holds (queries of a pass) x H x Sk values, never Sq x Sk: a pass covers as many
// queries as fit a fixed budget (all of a decoding step's up to 64, fewer for long prefills).
//
// Selection rule (the reference's, attnops/kernels/reference.py): the newest `local` keys always;
// of the older ones the top (topk - local) scores, ties to the later key, NaN ranked highest.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

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
  std::vector<T> tmp, s, q, acc, row;
  std::vector<int64_t> idx, cand;
  RowScratch(int64_t Sk, int64_t topk, int64_t D)
      : tmp(Sk), s(kGatherBlock + Vec<T>::size), q(D), acc(D), row(D), idx(std::min(Sk, topk)), cand(Sk) {}
};

// The c-th largest of s[0, m) (c >= 1), with in `cand` the ascending positions of every score >= a
// lower bound of it (all of them when the sample below fails). A plain nth_element over all m
// scores costs several passes; instead the threshold of a strided sample of ~1024 scores, set a
// few standard deviations below the expected rank, filters the row in one branch-free pass, and
// nth_element runs on the survivors (about c of them).
template <typename T>
T kth_largest(const T* s, int64_t m, int64_t c, RowScratch<T>& ws, int64_t& ncand) {
  int64_t* cand = ws.cand.data();
  T* tmp = ws.tmp.data();
  constexpr int64_t kSample = 1024;
  if (m > 4 * kSample && c * 4 < m) {
    const int64_t stride = m / kSample;
    int64_t ns = 0;
    for (int64_t j = 0; j < m; j += stride) tmp[ns++] = s[j];
    const double expect = double(c) * ns / m;
    const int64_t pick = std::min<int64_t>(ns - 1, int64_t(expect + 4.0 * std::sqrt(expect) + 8));
    std::nth_element(tmp, tmp + pick, tmp + ns, std::greater<T>());
    const T lower = tmp[pick];
    int64_t n = 0;
    for (int64_t j = 0; j < m; ++j) {
      cand[n] = j;
      n += s[j] >= lower;
    }
    if (n >= c) {
      for (int64_t x = 0; x < n; ++x) tmp[x] = s[cand[x]];
      std::nth_element(tmp, tmp + (c - 1), tmp + n, std::greater<T>());
      ncand = n;
      return tmp[c - 1];
    }
  }
  for (int64_t j = 0; j < m; ++j) cand[j] = j;
  std::copy(s, s + m, tmp);
  std::nth_element(tmp, tmp + (c - 1), tmp + m, std::greater<T>());
  ncand = m;
  return tmp[c - 1];
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
    for (int64_t x = 0; x < nb; ++x) {
      const int64_t j = idx[x0 + x];
      if (x0 + x + 8 < n) prefetch_row(kb + idx[x0 + x + 8] * k_row, D);
      prefetch_row<1>(vb + j * v_row, D);  // into L2: used after the block's K rows
      s[x] = dot(ws.q.data(), kb + j * k_row, D);
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

// S: the type of q, k, v; Ss: that of the low-rank scores' inputs (S, or a half-width plane).
template <typename S, typename Ss>
void lowrank_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& qs,
                    const at::Tensor& ks, const int32_t* lens, int64_t topk, int64_t local, bool causal,
                    double softmax_scale, at::Tensor& out, at::Tensor& lse, int32_t* chosen) {
  using T = compute_t<S>;
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2), R = qs.size(3), group = H / Hkv;
  const S* qp = q.data_ptr<S>();
  const S* kp = k.data_ptr<S>();
  const S* vp = v.data_ptr<S>();
  const Ss* qsp = qs.data_ptr<Ss>();
  const Ss* ksp = ks.data_ptr<Ss>();
  S* op = out.data_ptr<S>();
  T* lp = lse.data_ptr<T>();
  // score rows padded by a cache line: rows a power-of-two apart map to one L1 set, and phase 1
  // writes all of them in step
  const int64_t row_stride = Sk + 64 / int64_t(sizeof(T));
  const int64_t per_query = B * H * row_stride;
  const int64_t pass = std::clamp<int64_t>(kScoreBudget / per_query, 1, Sq);
  std::vector<T> scores(pass * per_query);
  const T scale = static_cast<T>(softmax_scale * kLog2e);  // base-2 scores

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
        for (int64_t i = i0; i < i0 + nq; ++i) last = std::max(last, row_keys(lens[b], Sq, i, causal, topk, local).cand_end);
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
    const int64_t rows = B * nq * H;
    run_tasks(
        rows,
        [&](int64_t t) { return row_keys(lens[t / (nq * H)], Sq, i0 + (t / H) % nq, causal, topk, local).end; },
        [&] { return RowScratch<T>(Sk, topk, D); },
        [&](int64_t t, RowScratch<T>& ws) {
          const int64_t b = t / (nq * H), i = i0 + (t / H) % nq, h = t % H, hk = h / group;
          const RowKeys rk = row_keys(lens[b], Sq, i, causal, topk, local);
          S* orow = op + b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
          T* lrow = lp + (b * H + h) * Sq + i;
          const int64_t n = rk.end > 0 ? select_keys(scores.data() + t * row_stride, rk, ws) : 0;
          if (chosen != nullptr) {  // (B, H, Sq, n_idx), -1 past the chosen keys
            const int64_t n_idx = std::min(Sk, topk);
            int32_t* c = chosen + ((b * H + h) * Sq + i) * n_idx;
            for (int64_t x = 0; x < n_idx; ++x) c[x] = x < n ? static_cast<int32_t>(ws.idx[x]) : -1;
          }
          if (n == 0) {
            std::fill(orow, orow + D, static_cast<S>(0.0f));
            *lrow = -std::numeric_limits<T>::infinity();
            return;
          }
          const S* qrow = qp + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
          for (int64_t d = 0; d < D; ++d) ws.q[d] = static_cast<T>(qrow[d]) * scale;
          const auto [m, l] = attend_chosen(ws, kp + b * k.stride(0) + hk * k.stride(2), k.stride(1),
                                            vp + b * v.stride(0) + hk * v.stride(2), v.stride(1), n, D);
          const T* acc = ws.acc.data();
          if (l == T(0)) {  // only -inf scores (infinite inputs)
            std::fill(orow, orow + D, static_cast<S>(0.0f));
            *lrow = -std::numeric_limits<T>::infinity();
            return;
          }
          const T inv = T(1) / l;
          for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<S>(acc[d] * inv);
          *lrow = static_cast<T>((m + std::log2(l)) * kLn2);
        });
  }
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
  at::Tensor out = maybe_poison(at::empty(q.sizes(), q.options()));
  at::Tensor lse = maybe_poison(at::empty({B, q.size(2), q.size(1)}, q.options().dtype(lse_dtype)));
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
