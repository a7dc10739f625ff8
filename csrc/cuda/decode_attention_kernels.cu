// Split-KV ("flash-decoding") attention kernels. See decode_attention.cuh.
//
// Split kernel: one block per (split, b * kv head); its 4 warps stride over the keys of the split,
// each lane holding D / 32 elements of a key/value row, so a row is one coalesced load. For a chunk
// of ROWS query rows of the kv group (row r = g * Sq + i), a score is a warp-reduced dot product,
// followed by an online softmax per row; the warps' partial states merge through shared memory
// into the split's partial output and lse. Every K/V element is read once per chunk of rows (once
// per group for MHA and for groups of up to ROWS rows). Combine kernel: one block per (b, h, i)
// merges the splits by lse.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

#include "decode_attention.cuh"

namespace attnops::cuda {
namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// ROWS query rows per pass: 1 for MHA single-token decoding (no wasted warp reductions), 4 or 8
// for groups (GQA/MQA, several new tokens).
template <typename T, int VPT, int ROWS>
__global__ void __launch_bounds__(kWarps * 32) decode_split_kernel(DecodeParams p) {
  const int split = blockIdx.x, bhk = blockIdx.y;
  const int b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.H / p.Hkv, rows = G * p.Sq;
  const int seqlen = min(max(p.seqlens[b], 0), p.Smax);
  const int s0 = split * p.chunk, s1 = min(s0 + p.chunk, seqlen);
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int part = bhk * p.splits + split;

  __shared__ float sm_m[kWarps][ROWS], sm_l[kWarps][ROWS];
  extern __shared__ float sm_acc[];  // [kWarps][ROWS][D]

  for (int r0 = 0; r0 < rows; r0 += ROWS) {
    float q[ROWS][VPT], acc[ROWS][VPT], m[ROWS], l[ROWS];
    int pos[ROWS], head[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = r0 + r, g = row / p.Sq, i = row % p.Sq;
      head[r] = hk * G + g;
      pos[r] = row < rows ? seqlen - p.Sq + i : -1;  // -1: no key (j >= 0) is visible
      m[r] = -INFINITY;
      l[r] = 0.f;
#pragma unroll
      for (int e = 0; e < VPT; ++e) {
        const int d = lane + 32 * e;
        q[r][e] = (row < rows && d < p.D) ? to_float(qb[i * p.q_ss + head[r] * p.q_sh + d]) * p.qk_scale : 0.f;
        acc[r][e] = 0.f;
      }
    }
    for (int j = s0 + warp; j < s1; j += kWarps) {
      float kv[VPT], vv[VPT];
#pragma unroll
      for (int e = 0; e < VPT; ++e) {
        const int d = lane + 32 * e;
        kv[e] = d < p.D ? to_float(kb[(int64_t)j * p.k_ss + d]) : 0.f;
        vv[e] = d < p.D ? to_float(vb[(int64_t)j * p.v_ss + d]) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < VPT; ++e) s += q[r][e] * kv[e];
        s = warp_sum(s);
        bool visible = j <= pos[r] && (p.window_left < 0 || j >= pos[r] - p.window_left);
        if (visible && p.keep != nullptr) {
          const int i = (r0 + r) % p.Sq;
          visible = p.keep[b * p.keep_sb + head[r] * p.keep_sh + (i / p.keep_bq) * p.keep_sq + j / p.keep_bk] != 0;
        }
        if (!visible) continue;
        const float m_new = fmaxf(m[r], s);
        const float alpha = exp2f(m[r] - m_new), pr = exp2f(s - m_new);
        l[r] = l[r] * alpha + pr;
#pragma unroll
        for (int e = 0; e < VPT; ++e) acc[r][e] = acc[r][e] * alpha + pr * vv[e];
        m[r] = m_new;
      }
    }
    // merge the warps' states
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (lane == 0) {
        sm_m[warp][r] = m[r];
        sm_l[warp][r] = l[r];
      }
#pragma unroll
      for (int e = 0; e < VPT; ++e) {
        const int d = lane + 32 * e;
        if (d < p.D) sm_acc[(warp * ROWS + r) * p.D + d] = acc[r][e];
      }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < ROWS * p.D; x += kWarps * 32) {
      const int r = x / p.D, d = x % p.D, row = r0 + r;
      if (row >= rows) continue;
      float mx = -INFINITY;
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][r]);
      float total = 0.f, o = 0.f;
      if (mx != -INFINITY) {
        for (int w = 0; w < kWarps; ++w) {
          const float scale = exp2f(sm_m[w][r] - mx);
          total += sm_l[w][r] * scale;
          o += sm_acc[(w * ROWS + r) * p.D + d] * scale;
        }
      }
      const bool empty = total == 0.f;
      p.opart[((int64_t)part * rows + row) * p.D + d] = empty ? 0.f : o / total;
      if (d == 0) p.lpart[(int64_t)part * rows + row] = empty ? -INFINITY : (mx + log2f(total)) * 0.6931471805599453f;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void decode_combine_kernel(DecodeParams p) {
  const int x = blockIdx.x;
  const int b = x / (p.H * p.Sq), h = (x / p.Sq) % p.H, i = x % p.Sq;
  const int G = p.H / p.Hkv, rows = G * p.Sq, r = (h % G) * p.Sq + i;
  const int64_t base = (int64_t)(b * p.Hkv + h / G) * p.splits;
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.lpart[(base + s) * rows + r]);
  T* out = static_cast<T*>(p.out) + b * p.o_sb + i * p.o_ss + h * p.o_sh;
  float total = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < p.splits; ++s) total += expf(p.lpart[(base + s) * rows + r] - mx);
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float o = 0.f;
    if (mx != -INFINITY)
      for (int s = 0; s < p.splits; ++s)
        o += expf(p.lpart[(base + s) * rows + r] - mx) * p.opart[((base + s) * rows + r) * p.D + d];
    out[d] = from_float<T>(mx == -INFINITY ? 0.f : o / total);
  }
  if (threadIdx.x == 0) p.lse[((int64_t)b * p.H + h) * p.Sq + i] = mx == -INFINITY ? -INFINITY : mx + logf(total);
}

template <typename T, int VPT, int ROWS>
void launch_split(const DecodeParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(float) * kWarps * ROWS * p.D;
  decode_split_kernel<T, VPT, ROWS><<<dim3(p.splits, p.B * p.Hkv), kWarps * 32, smem, stream>>>(p);
}

template <typename T, int VPT>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const int rows = p.H / p.Hkv * p.Sq;
  if (rows == 1) launch_split<T, VPT, 1>(p, stream);
  else if (rows <= 4) launch_split<T, VPT, 4>(p, stream);
  else launch_split<T, VPT, 8>(p, stream);
  decode_combine_kernel<T><<<p.B * p.H * p.Sq, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_vpt(const DecodeParams& p, cudaStream_t stream) {
  switch ((p.D + 31) / 32) {
    case 1: return launch_typed<T, 1>(p, stream);
    case 2: return launch_typed<T, 2>(p, stream);
    case 3: return launch_typed<T, 3>(p, stream);
    case 4: return launch_typed<T, 4>(p, stream);
    case 5: return launch_typed<T, 5>(p, stream);
    case 6: return launch_typed<T, 6>(p, stream);
    case 7: return launch_typed<T, 7>(p, stream);
    case 8: return launch_typed<T, 8>(p, stream);
    default: return cudaErrorInvalidValue;  // head dims above 256 are rejected before launch
  }
}

}  // namespace

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_vpt<float>(p, stream);
    case DType::kFloat16: return launch_vpt<__half>(p, stream);
    case DType::kBFloat16: return launch_vpt<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace attnops::cuda
