// Small GEMM for attention blocks: C (M x N) [+]= A (M x K) * B (K x N), B in panel layout.
//
// A kGemmMR x (2 vectors) register tile. A is row-major and read in place (rows broadcast from their own
// stride: attention blocks are small, A stays in L1/L2). B is packed in panels of kGemmN columns:
// element (k, n) lives at B[(n / kGemmN) * strip + k * kGemmN + n % kGemmN], so a micro-tile reads
// its B strip sequentially. The kernels pack every B operand this way once per call; a plain
// row-major B with a 16 KB row stride (K^T of a 4K sequence) put all rows of a tile into one L1
// set and ran 30% slower end to end. Measured on the dev machine (Zen 4, one thread, AVX2):
// 95-105 GFLOP/s at 64x256x64 / 64x64x128, against 85 for MKL sgemm at the same shapes.
// N must be a multiple of kGemmN (callers pad); M and K are arbitrary. With TransA, A is given
// transposed: element (m, k) at A[k * lda + m] (the fused backward multiplies dS^T, as stored).
// With c_scale, accumulation starts from c_scale[m] * C[m, :]: the online softmax's rescaling of the
// output rows rides on the load of the P V product instead of a separate pass over them (that pass
// was 15% of the non-GEMM time of a sliding-window forward).
#pragma once

#include "cpu/vec.h"

namespace attnops::cpu::ATTNOPS_ISA {

template <typename T>
inline constexpr int kGemmN = 2 * Vec<T>::size;

template <typename T, int MR, bool TransA>
inline void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, T* C, int64_t ldc, bool accumulate,
                      const T* c_scale) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  V c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      const T scale = c_scale ? c_scale[r] : T(1);
      c0[r] = vload(C + r * ldc) * scale;
      c1[r] = vload(C + r * ldc + W) * scale;
    } else {
      c0[r] = V{};
      c1[r] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = vload(B + k * 2 * W), b1 = vload(B + k * 2 * W + W);
    for (int r = 0; r < MR; ++r) {
      const T a = TransA ? A[k * lda + r] : A[r * lda + k];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    vstore(C + r * ldc, c0[r]);
    vstore(C + r * ldc + W, c1[r]);
  }
}

// Rows per register tile: 4 rows x 2 vectors = 8 accumulators fill the 16 registers of SSE/AVX2
// with the B vectors and a broadcast; AVX-512's 32 registers hold 8 rows (16 accumulators), enough
// independent FMAs to cover two FMA ports' latency.
inline constexpr int kGemmMR = kVectorBytes == 64 ? 8 : 4;

// The tile of the M % kGemmMR leftover rows, MR chosen at run time.
template <typename T, bool TransA, int MR = kGemmMR - 1>
inline void gemm_rest(int64_t rows, int64_t K, const T* A, int64_t lda, const T* B, T* C, int64_t ldc,
                      bool accumulate, const T* c_scale) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_tile<T, MR, TransA>(K, A, lda, B, C, ldc, accumulate, c_scale);
    gemm_rest<T, TransA, MR - 1>(rows, K, A, lda, B, C, ldc, accumulate, c_scale);
  }
}

// `strip`: distance between consecutive B panels, in elements.
template <typename T, bool TransA = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t strip, T* C,
                 int64_t ldc, bool accumulate, const T* c_scale = nullptr) {
  constexpr int NR = kGemmN<T>;
  constexpr int MR = kGemmMR;
  for (int64_t n = 0; n < N; n += NR) {
    const T* Bn = B + (n / NR) * strip;
    int64_t m = 0;
    auto a_rows = [&](int64_t row) { return TransA ? A + row : A + row * lda; };
    for (; m + MR <= M; m += MR)
      gemm_tile<T, MR, TransA>(K, a_rows(m), lda, Bn, C + m * ldc + n, ldc, accumulate, c_scale ? c_scale + m : nullptr);
    if (m < M)
      gemm_rest<T, TransA>(M - m, K, a_rows(m), lda, Bn, C + m * ldc + n, ldc, accumulate, c_scale ? c_scale + m : nullptr);
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace attnops::cpu::ATTNOPS_ISA
