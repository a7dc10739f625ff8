// Split-KV decoding on CUDA: parameters and launcher. Free of torch headers, so that the kernels
// compile with nvcc alone (CI compiles them for sm_80 and sm_90 without a CUDA torch); the torch
// glue is decode_attention.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attnops::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct DecodeParams {
  const void* q;           // (B, Sq, H, D)
  const void* k;           // (B, Smax, Hkv, D)
  const void* v;           // (B, Smax, Hkv, D)
  const int32_t* seqlens;  // (B,)
  const uint8_t* keep;     // optional (Bm, Hm, Nq, Nk) kept key blocks
  void* out;               // (B, Sq, H, D)
  float* lse;              // (B, H, Sq)
  float* opart;            // (B * Hkv * splits, rows, D) partial outputs, rows = (H / Hkv) * Sq
  float* lpart;            // (B * Hkv * splits, rows) partial lse
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh;
  int64_t keep_sb, keep_sh, keep_sq;  // 0 on broadcast dims
  int B, Sq, H, Hkv, D, Smax;
  float qk_scale;  // softmax_scale * log2(e)
  int window_left;  // -1: none
  int splits, chunk;  // the cache length is cut into `splits` chunks of `chunk` keys
  int keep_bq, keep_bk;
  DType dtype;
};

// Launches the split and combine kernels on `stream`; returns the launch error, if any.
cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream);

}  // namespace attnops::cuda
