// Every attnops operator schema, in one place. Kernels register implementations per device with
// TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); fake (meta) implementations and autograd are
// registered in Python (attnops/kernels/cpu.py), and backward passes are operators of their own.
#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "ops.h"

namespace attnops {

namespace {
std::atomic<bool> g_poison_outputs{false};
std::atomic<int> g_backward_mode{0};
}  // namespace

bool poison_outputs() { return g_poison_outputs.load(std::memory_order_relaxed); }

bool deterministic_schedule() {
  if (at::globalContext().deterministicAlgorithms()) return true;
  const char* env = std::getenv("ATTNOPS_DETERMINISTIC");
  return env != nullptr && env[0] != '\0' && std::string(env) != "0";
}
int backward_mode() { return g_backward_mode.load(std::memory_order_relaxed); }

}  // namespace attnops

TORCH_LIBRARY(attnops, m) {
  // Block-sparse attention core (dense, causal and windowed attention are the LUT-less case).
  // q (B, Sq, H, D), k/v (B, Sk, Hkv, D); kv_num_blocks (Bm, Hm, ceil(Sq/block_q)) and
  // kv_indices (Bm, Hm, ceil(Sq/block_q), W) int32. Returns out (B, Sq, H, D) and
  // lse (B, H, Sq) (float32; float64 for float64 inputs). The forward does not read the transposed
  // LUT (q_num_blocks, q_indices); it takes it so that autograd can save it for the backward.
  // map_rows > 0 asks for the block attention map as partial sums (map_max: maxima) of the softmax
  // probabilities over map_rows queries x map_cols keys: (B, H, ceil(Sq/map_rows), ceil(Sk/map_cols))
  // in lse's dtype (attnops/kernels/block_map.py pools it); else the third output is empty.
  m.def(
      "block_sparse_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? kv_num_blocks, Tensor? kv_indices, "
      "Tensor? q_num_blocks, Tensor? q_indices, int block_q, int block_k, float softmax_scale, bool causal, int window_left, int window_right, "
      "int map_rows=0, int map_cols=0, bool map_max=False) -> (Tensor, Tensor, Tensor)");
  // dlse: gradient flowing into lse when the caller used it (None otherwise).
  m.def(
      "block_sparse_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? q_num_blocks, Tensor? q_indices, "
      "int block_q, int block_k, float softmax_scale, bool causal, int window_left, int window_right) "
      "-> (Tensor, Tensor, Tensor)");
  // Split-KV decoding: q (B, Sq_new, H, D) against caches (B, S_max, Hkv, D) holding
  // cache_seqlens (B,) valid keys each; causal within the new tokens, aligned to each sequence's
  // end; window_left (-1: none); block_keep: optional uint8 (Bm, Hm, Nq, Nk) kept key blocks;
  // num_splits 0 = automatic. Forward only. Returns out (B, Sq_new, H, D), lse (B, H, Sq_new), and
  // with map_cols > 0 the block map per query row, (B, H, Sq_new, ceil(S_max / map_cols)) in lse's
  // dtype: sums (map_max: maxima) of the probabilities over map_cols keys, fused into the forward
  // (the CPU kernel; CUDA refuses it and the map is a Python pass there), else an empty tensor.
  m.def(
      "decode_attn_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_keep, "
      "int block_q, int block_k, float softmax_scale, int window_left, int num_splits, int map_cols=0, "
      "bool map_max=False) -> (Tensor, Tensor, Tensor)");
  // MoBA router: q (B, S, H, D), k (B, S, Hkv, D); per query tile of route_block rows, the MoBA
  // blocks (block_size keys, a multiple of route_block) whose mean key scores highest against the
  // tile's mean query: its own block plus the top (topk - 1) others (causal: earlier ones only).
  // Returns the block LUT at (route_block, route_block) granularity: kv_num_blocks (B, H, Nt) and
  // kv_indices (B, H, Nt, W) int32, ascending, Nt = ceil(S / route_block).
  // Low-rank-key attention (Loki): q (B, Sq, H, D), k/v (B, Sk, Hkv, D); q_score (B, Sq, H, R) and
  // k_score (B, Sk, Hkv, R) the first R components of the rotated queries and keys (views with
  // strides are fine). Query i of sequence b sits at seqlens[b] - Sq + i (seqlens None: Sk each)
  // and sees keys [0, seqlens[b]) (causal: up to its position); it attends exactly to the newest
  // `local` of them plus the (topk - local) older ones of highest q_score . k_score (ties to the
  // later key). Forward only. Returns out (B, Sq, H, D), lse (B, H, Sq) over the chosen keys, and
  // with return_indices the chosen keys (B, H, Sq, min(topk, Sk)) int32, ascending, -1 past the
  // last (else an empty tensor): the block maps are computed from them.
  m.def(
      "lowrank_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor q_score, Tensor k_score, Tensor? seqlens, int topk, "
      "int local, bool causal, float softmax_scale, bool return_indices=False) -> (Tensor, Tensor, Tensor)");
  m.def("moba_route(Tensor q, Tensor k, int block_size, int topk, bool causal, int route_block) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnops C++/CUDA kernels; the operators live in torch.ops.attnops";
  m.def(
      "_set_poison_outputs",
      [](bool enable) { return attnops::g_poison_outputs.exchange(enable); },
      "Fill kernel outputs with NaN at allocation (test aid); returns the previous setting.");
  m.def(
      "_set_backward_mode",
      [](int mode) {
        TORCH_CHECK(mode >= 0 && mode <= 2, "backward mode must be 0 (auto), 1 (fused) or 2 (two-pass)");
        return attnops::g_backward_mode.exchange(mode);
      },
      "CPU attention backward: 0 auto, 1 fused single pass, 2 two passes (test aid); returns the previous mode.");
}
