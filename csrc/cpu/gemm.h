// Small GEMM for attention blocks: C (M x N) [+]= A (M x K) * B (K x N), B in panel layout.
//
// A kGemmMR x (2 vectors) register tile. A is row-major and read in place (rows broadcast from their own
// stride: attention blocks are small, A stays in L1/L2). B is packed in panels of kGemmN columns:
// element (k, n) lives at B[(n / kGemmN) * strip + k * kGemmN + n % kGemmN], so a micro-tile reads
// its B strip sequentially. The kernels pack every B operand this way once per call; a plain
// row-major B with a 16 KB row stride (K^T of a 4K sequence) put all rows of a tile into one L1
// set and ran 30% slower end to end. Measured on the dev machine (Zen 4, one thread, AVX2):
// 95-105 GFLOP/s at 64x256x64 / 64x64x128, against 85 for MKL sgemm at the same shapes.
// N must be a multiple of the vector width W (callers pad; the tail panel's other columns are not written); M
// and K are arbitrary. With TransA, A is given transposed: element (m, k) at A[k * lda + m] (the fused
// backward multiplies dS^T, as stored).
// With accumulate, C[m, :] = c_scale[m] * C[m, :] + (A B)[m, :] (c_scale null: 1): the online softmax's rescaling
// of the output rows rides on the P V product instead of a separate pass over them (that pass was 15% of the
// non-GEMM time of a sliding-window forward). The product is summed from zero and C added once at the end
// (two-level summation): started from C, a row summed over N keys in one float chain, whose rounding grows
// with sqrt(N) relative to the accumulator; so summed, f32 dense attention at N = 4096 had 2.7x SDPA's mean
// error, and v = 1 gave rows of 1 +- 7.5e-7 (README, "Summation order").
#pragma once

#include "cpu/vec.h"

namespace attnops::cpu::ATTNOPS_ISA {

template <typename T>
inline constexpr int kGemmN = 2 * Vec<T>::size;

// NV: the tile's width in vectors, 2 (a whole panel) or 1 (its first W columns: the last panel of an N that is an
// odd multiple of W, whose other half would be padding; B keeps the panel's NR stride).
template <typename T, int MR, bool TransA, int NV = 2>
inline void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, T* C, int64_t ldc, bool accumulate,
                      const T* c_scale) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::size;
  static_assert(NV == 1 || NV == 2);
  V c[NV][MR];
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x) c[x][r] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int x = 0; x < NV; ++x) b[x] = vload(B + k * 2 * W + x * W);
    for (int r = 0; r < MR; ++r) {
      const T a = TransA ? A[k * lda + r] : A[r * lda + k];
      for (int x = 0; x < NV; ++x) c[x][r] += a * b[x];
    }
  }
  for (int r = 0; r < MR; ++r) {
    const T scale = c_scale ? c_scale[r] : T(1);
    for (int x = 0; x < NV; ++x) {
      V out = c[x][r];
      if (accumulate) out += vload(C + r * ldc + x * W) * scale;
      vstore(C + r * ldc + x * W, out);
    }
  }
}

// Rows per register tile: 4 rows x 2 vectors = 8 accumulators fill the 16 registers of SSE/AVX2
// with the B vectors and a broadcast; AVX-512's 32 registers hold 8 rows (16 accumulators), enough
// independent FMAs to cover two FMA ports' latency.
inline constexpr int kGemmMR = kVectorBytes == 64 ? 8 : 4;

// The tile of the M % kGemmMR leftover rows, MR chosen at run time.
template <typename T, bool TransA, int NV, int MR = kGemmMR - 1>
inline void gemm_rest(int64_t rows, int64_t K, const T* A, int64_t lda, const T* B, T* C, int64_t ldc,
                      bool accumulate, const T* c_scale) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_tile<T, MR, TransA, NV>(K, A, lda, B, C, ldc, accumulate, c_scale);
    gemm_rest<T, TransA, NV, MR - 1>(rows, K, A, lda, B, C, ldc, accumulate, c_scale);
  }
}

// The rows of one panel (NV vectors of its columns).
template <typename T, bool TransA, int NV>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, T* C, int64_t ldc,
                       bool accumulate, const T* c_scale) {
  constexpr int MR = kGemmMR;
  auto a_rows = [&](int64_t row) { return TransA ? A + row : A + row * lda; };
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_tile<T, MR, TransA, NV>(K, a_rows(m), lda, B, C + m * ldc, ldc, accumulate, c_scale ? c_scale + m : nullptr);
  if (m < M)
    gemm_rest<T, TransA, NV>(M - m, K, a_rows(m), lda, B, C + m * ldc, ldc, accumulate, c_scale ? c_scale + m : nullptr);
}

// `strip`: distance between consecutive B panels, in elements. N a multiple of W (Vec<T>::size); a last panel
// of W columns runs the one-vector tile: at 16 keys and AVX-512 (32-column panels) the two-vector tile spent
// half its FMAs, and the softmax after it half its passes, on padding.
template <typename T, bool TransA = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t strip, T* C,
                 int64_t ldc, bool accumulate, const T* c_scale = nullptr) {
  constexpr int NR = kGemmN<T>;
  for (int64_t n = 0; n < N; n += NR) {
    const T* Bn = B + (n / NR) * strip;
    if (n + NR <= N)
      gemm_panel<T, TransA, 2>(M, K, A, lda, Bn, C + n, ldc, accumulate, c_scale);
    else
      gemm_panel<T, TransA, 1>(M, K, A, lda, Bn, C + n, ldc, accumulate, c_scale);
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace attnops::cpu::ATTNOPS_ISA
