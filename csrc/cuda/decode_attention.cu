// torch glue of the CUDA decode kernels (decode_attention_kernels.cu): the CUDA implementation of
// attnops::decode_attn_fwd. Built only when torch has CUDA (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/decode_attention.cuh"
#include "ops.h"

namespace attnops::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attn_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_keep, int64_t block_q, int64_t block_k, double softmax_scale,
    int64_t window_left, int64_t num_splits, int64_t map_cols, bool map_max, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& cache_leftpad) {
  constexpr const char* op = "decode_attn_fwd";
  TORCH_CHECK(!(block_table.has_value() && block_table->defined()), op,
              ": the CUDA decode kernel reads contiguous caches; a paged cache (block_table) runs on the Triton "
              "kernel (the default on CUDA tensors), the C++ kernels and the PyTorch fallback");
  TORCH_CHECK(!(cache_leftpad.has_value() && cache_leftpad->defined()), op,
              ": the CUDA decode kernel reads each sequence from its first cache row; a left-padded cache "
              "(cache_leftpad) runs on the Triton kernel (the default on CUDA tensors), the C++ kernels and the "
              "PyTorch fallback");
  check_decode_args(op, q_in, k_in, v_in, block_keep, block_q, block_k, softmax_scale, window_left, num_splits,
                    map_cols);
  check_score_mod_args(op, q_in, softcap, alibi_slopes, c10::nullopt);
  // Score modifiers live in the Triton decode kernel (the default on CUDA tensors) and the C++ one.
  TORCH_CHECK(softcap == 0 && !(alibi_slopes.has_value() && alibi_slopes->defined()), op,
              ": the CUDA decode kernel does not implement softcap or alibi_slopes; use backend='triton' (the "
              "default on CUDA tensors)");
  // the block map of this backend is a second pass in Python (attnops.kernels.block_map.decode_block_map)
  TORCH_CHECK(map_cols == 0, "the CUDA decode kernel computes no fused block map");
  // a lane holds D/32 values of q and of the accumulator per row; past 256 the split kernel's shared rows outgrow
  // the default 48 KiB of dynamic shared memory: the Triton decode kernel (the default on CUDA) takes up to 512
  TORCH_CHECK(q_in.size(3) <= 256, op, ": the CUDA decode kernel takes head dims up to 256, got ", q_in.size(3),
              "; use backend='triton' (the default on CUDA tensors)");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "the CUDA decode kernel takes float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  // The kernel loads a key row as 32 lanes x D/32 elements of one head: heads must be dense rows.
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode: cache rows must be contiguous");
  const at::Tensor lens = checked_lengths(op, "cache_seqlens", cache_seqlens, q.size(0), k.size(1));  // clamped
  window_left = std::min<int64_t>(window_left, k.size(1));
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Smax = k.size(1), Hkv = k.size(2), rows = (H / Hkv) * Sq;

  at::Tensor out = maybe_poison(at::empty(q.sizes(), q.options()));
  at::Tensor lse = maybe_poison(at::empty({B, H, Sq}, q.options().dtype(at::kFloat)));
  if (q.numel() == 0) return {out, lse, at::empty({0}, lse.options())};

  int64_t splits = num_splits;
  if (splits <= 0) {  // about two waves of blocks, splits of at least 256 keys
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device());
    splits = std::max<int64_t>(1, std::min<int64_t>((2 * sms + B * Hkv - 1) / (B * Hkv), (Smax + 255) / 256));
  }
  splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, Smax));
  const int64_t chunk = (Smax + splits - 1) / splits;
  at::Tensor opart = at::empty({B * Hkv * splits, rows, D}, q.options().dtype(at::kFloat));
  at::Tensor lpart = at::empty({B * Hkv * splits, rows}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.seqlens = lens.data_ptr<int32_t>();
  at::Tensor keep;
  if (block_keep.has_value() && block_keep->defined()) {
    keep = block_keep->to(at::kByte).contiguous();
    p.keep = keep.data_ptr<uint8_t>();
    p.keep_sb = keep.size(0) > 1 ? keep.stride(0) : 0;
    p.keep_sh = keep.size(1) > 1 ? keep.stride(1) : 0;
    p.keep_sq = keep.stride(2);
    p.keep_bq = static_cast<int>(block_q);
    p.keep_bk = static_cast<int>(block_k);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.opart = opart.data_ptr<float>();
  p.lpart = lpart.data_ptr<float>();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_ss = out.stride(1), p.o_sh = out.stride(2);
  p.B = B, p.Sq = Sq, p.H = H, p.Hkv = Hkv, p.D = D, p.Smax = Smax;
  p.qk_scale = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.window_left = static_cast<int>(window_left);
  p.splits = static_cast<int>(splits), p.chunk = static_cast<int>(chunk);
  p.dtype = dtype == at::kFloat ? DType::kFloat32 : dtype == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  const cudaError_t err = launch_decode_attention(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "attnops decode kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse, at::empty({0}, lse.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnops, CUDA, m) { m.impl("decode_attn_fwd", &decode_attn_fwd_cuda); }

}  // namespace attnops::cuda
