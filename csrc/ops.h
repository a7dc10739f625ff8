// Shared by every kernel translation unit: the debug switch that NaN-fills outputs at allocation.
#pragma once

#include <ATen/ATen.h>

namespace attnops {

// When on (tests turn it on), kernels fill every output with NaN right after allocating it, so an
// element a kernel forgets to write fails the comparison with the reference.
bool poison_outputs();

// Which backward algorithm the CPU attention kernels use: 0 chooses by problem size, 1 forces the
// fused single pass, 2 the two-pass one (tests run both).
int backward_mode();

// Integer outputs (block LUTs) get -1, which no valid LUT entry or count holds.
inline at::Tensor maybe_poison(at::Tensor t) {
  if (poison_outputs()) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) t.fill_(-1);
  }
  return t;
}

// Kernels index the head dim with stride 1; any other layout is taken as strides (no copy).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Shape checks of decode_attn_fwd shared by its CPU and CUDA implementations (the Python op has
// already given the user-facing error; these guard direct calls of the registered op).
inline void check_decode_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cache_seqlens) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k_cache, v_cache must be 4-d");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "decode: q/cache shapes do not fit");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q.size(0), "cache_seqlens must be (B,)");
}

}  // namespace attnops
