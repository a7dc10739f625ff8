// Runtime ISA dispatch of the CPU kernels.
//
// The kernels (csrc/cpu/kernels/*.cpp and the headers beside this one) are compiled once per ISA
// level, each time into its own namespace attnops::cpu::<level>, by one small translation unit per
// level (csrc/cpu/isa_<level>.cpp): it includes the torch and standard headers first, under the
// build's baseline target, then switches the target with #pragma GCC target and includes the
// kernels with ATTNOPS_ISA (the namespace) and ATTNOPS_VEC_BYTES (the vector width) set. Torch's
// inline functions and the standard templates therefore keep the baseline target (no ODR clash
// between levels inside the one .so: a function with AVX-512 instructions that the linker picked
// for every caller would fault on an AVX2 machine), and each level's kernel code is its own.
// tests/core/test_cpu_isa.py disassembles the .so to check that no code outside a level's
// namespace uses wider registers than the baseline.
//
// The dispatcher (csrc/cpu/dispatch.cpp, baseline target) registers one CPU kernel per operator,
// which calls the table of the level chosen when the extension loads: the best level this CPU
// supports (cpuid, OS support of the register state included, via __builtin_cpu_supports), or
// the one ATTNOPS_CPU_ISA names (generic | avx2 | avx512 | amx). The amx level runs the avx512 level's
// code with its bf16 tile products sent to oneDNN's brgemm (bf16_brgemm()). A forced level the CPU or the build
// lacks is refused with an error at the first kernel call rather than run into SIGILL.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

// Levels beyond the baseline need x86-64 and GCC's target pragmas (clang ignores them in C++ and
// other architectures have none of these ISAs): elsewhere only the generic level is built.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATTNOPS_MULTI_ISA 1
#else
#define ATTNOPS_MULTI_ISA 0
#endif

namespace attnops::cpu {

using OptTensor = c10::optional<at::Tensor>;
using Tensor = at::Tensor;

// One level's kernels, one entry per operator registered for the CPU. The signatures are the
// operators' schemas (attnops/core/library.py and the families' library.py); the table initialiser
// in each level's unit checks the kernels against them.
struct CpuKernels {
  const char* name;
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*block_sparse_attn_fwd)(
      const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& kv_num_blocks,
      const OptTensor& kv_indices, const OptTensor& q_num_blocks, const OptTensor& q_indices, int64_t block_q,
      int64_t block_k, double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
      int64_t map_rows, int64_t map_cols, bool map_max, double softcap, const OptTensor& alibi_slopes,
      const OptTensor& sinks, const OptTensor& attn_bias, double dropout_p, const OptTensor& dropout_seed,
      const OptTensor& key_bounds, const OptTensor& query_bounds, const OptTensor& alibi_offsets, bool return_max);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*block_sparse_attn_bwd)(
      const Tensor& dout, const OptTensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
      const Tensor& out, const Tensor& lse, const OptTensor& kv_num_blocks, const OptTensor& kv_indices,
      const OptTensor& q_num_blocks, const OptTensor& q_indices, int64_t block_q, int64_t block_k,
      double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
      const OptTensor& alibi_slopes, const OptTensor& attn_bias, bool bias_grad, double dropout_p,
      const OptTensor& dropout_seed, const OptTensor& key_bounds, const OptTensor& query_bounds,
      const OptTensor& alibi_offsets);
  std::tuple<Tensor, Tensor, Tensor> (*decode_attn_fwd)(
      const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cache_seqlens, const OptTensor& block_keep,
      int64_t block_q, int64_t block_k, double softmax_scale, int64_t window_left, int64_t num_splits,
      int64_t map_cols, bool map_max, double softcap, const OptTensor& alibi_slopes, const OptTensor& block_table,
      const OptTensor& cache_leftpad);
  std::tuple<Tensor, Tensor, Tensor> (*lowrank_attn_fwd)(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& qs, const Tensor& ks,
                                                         const OptTensor& seqlens, int64_t topk, int64_t local,
                                                         bool causal, double softmax_scale, bool return_indices);
  std::tuple<Tensor, Tensor> (*moba_route)(const Tensor& q, const Tensor& k, int64_t block_size, int64_t topk,
                                           bool causal, int64_t route_block);
  std::tuple<Tensor, Tensor> (*moba_token_select)(const Tensor& gate, int64_t block_size, int64_t topk, bool causal,
                                                  int64_t width);
  std::tuple<Tensor, Tensor> (*moba_token_pairs)(const Tensor& chosen, const Tensor& block_start,
                                                 const Tensor& block_end, int64_t group);
  void (*moba_token_merge)(Tensor& out, const Tensor& own, const Tensor& out_pair, const Tensor& scale,
                           const Tensor& row, int64_t head_start, int64_t heads);
};

// Each level's table, defined in csrc/cpu/isa_<level>.cpp.
namespace generic {
extern const CpuKernels kernels;
}
#if ATTNOPS_MULTI_ISA
namespace avx2 {
extern const CpuKernels kernels;
}
namespace avx512 {
extern const CpuKernels kernels;
}
#endif

// The levels this build has and this CPU can run, from the most portable to the fastest.
std::vector<std::string> runnable_levels();
// The level the kernels run at (throws when ATTNOPS_CPU_ISA named one that cannot run here).
const CpuKernels& active_kernels();
// Switches the level (test aid: the suite runs every runnable level); returns the previous name.
std::string set_level(const std::string& name);
// AVX-512 with AVX512-BF16 (VDPBF16PS), OS support of the register state included: what the avx512 level's bf16
// products need (the one check of it: bf16_dot's default and switch, the amx level, set_bf16_brgemm). False in a
// build without the x86 levels.
bool has_avx512_bf16();
// Whether the bf16 tile products are on when nothing forces them (bf16_dot()): AVX512-BF16, and either the amx
// level's brgemm calls or a CPU that is not Intel's: the level's own kernel ran 1.3-1.9x slower than widening on a
// Xeon with AMX (two 512-bit FMAs a cycle there against one VDPBF16PS: the same multiplies, plus the pair
// packing), 1.3-1.9x faster on Zen 4/5 (README, "CPU instruction sets").
bool bf16_dot_by_default();
// Whether bf16 tile products (where the avx512 level multiplies in bf16: bf16_dot()) call oneDNN's brgemm
// (at::native::cpublas::brgemm: AMX tiles where the CPU has them) instead of the level's VDPBF16PS kernel: at the
// amx level, or as set_bf16_brgemm forces it.
bool bf16_brgemm();
// -1 follows the level, 0 / 1 force it off / on (test aid: on a CPU without AMX, brgemm runs oneDNN's AVX-512
// code through the same calls); returns the previous mode.
int set_bf16_brgemm(int mode);

}  // namespace attnops::cpu

// The table of the level being compiled, for the end of csrc/cpu/isa_<level>.cpp (after the
// target pragma is popped: the table is constant data, no code).
#define ATTNOPS_DEFINE_CPU_KERNELS(level)                                                                \
  namespace attnops::cpu::level {                                                                      \
  extern const CpuKernels kernels;                                                                     \
  const CpuKernels kernels = {#level,          &block_sparse_attn_fwd_cpu, &block_sparse_attn_bwd_cpu, \
                              &decode_attn_fwd_cpu, &lowrank_attn_fwd_cpu,  &moba_route_cpu,          \
                              &moba_token_select_cpu,      &moba_token_pairs_cpu,                      \
                              &moba_token_merge_cpu};                                                  \
  }
