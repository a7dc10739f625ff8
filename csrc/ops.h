// Shared by every kernel translation unit: the debug switch that NaN-fills outputs at allocation.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace attnops {

// When on (tests turn it on), kernels fill every output with NaN right after allocating it, so an
// element a kernel forgets to write fails the comparison with the reference.
bool poison_outputs();

// Results that do not depend on the thread count: torch.use_deterministic_algorithms(True) or
// ATTNOPS_DETERMINISTIC=1. The kernels are deterministic at a fixed thread count either way; with this,
// the schedules that the thread count would pick (the attention backward's algorithm, the decode
// split count) are fixed instead.
bool deterministic_schedule();

// Which backward algorithm the CPU attention kernels use: 0 chooses by problem size, 1 forces the
// fused single pass, 2 the two-pass one (tests run both).
int backward_mode();

// Whether bfloat16 inputs may multiply their tiles in bf16 with AVX512-BF16 (the avx512 level's kernel, the amx
// level's brgemm): as ATTNOPS_CPU_BF16_DOT=0 / 1 or _C._set_bf16_dot force it, else the CPU's default
// (cpu::bf16_dot_by_default: off at the avx512 level of an Intel CPU, where widening is faster).
bool bf16_dot();
// Whether the CPU forward may pack a dilated block mask's keys by residue class (cpu/mask.h, KeyClasses): on unless
// ATTNOPS_CPU_KEY_CLASSES=0, read at every call (tests switch it between calls).
bool key_classes_on();
// K / V panel bytes one wave of the CPU forward packs (cpu/kernels/block_sparse_attention.cpp); test aid to shrink it.
int64_t forward_wave_bytes();

// Scratch that outlives a call. The CPU kernels' largest temporaries (the forward's packed K / V panels, 16 MiB
// a wave) were allocated per call; glibc maps buffers that large afresh or trims them off its heap when they
// are freed, so every call paid their first-touch page faults (~4K of them a 16 MiB buffer, ~3 us each on the
// VMs the README measures). A Workspace takes a buffer of at least `bytes` from a small cache that ops.cpp keeps
// between calls (64 MiB in all by default, ATTNOPS_CPU_WORKSPACE_MB; 0 turns the cache off) and gives it
// back when it goes out of scope. With poison_outputs() on, a taken buffer is filled with 0xFF bytes (NaN,
// -1), so a kernel that reads scratch it did not write in this call fails its tests.
// (Not a template, and no std::optional of it in the kernels: their units are compiled once per ISA level, and a
// template instantiated in each would be one symbol with several bodies.)
class Workspace {
 public:
  Workspace() = default;
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // A buffer of at least `bytes` (64-byte aligned), held until the Workspace is destroyed; once per Workspace.
  void* take(int64_t bytes);
  bool taken() const { return buffer_.defined(); }

 private:
  at::Tensor buffer_;
};

// Integer outputs (block LUTs) get -1, which no valid LUT entry or count holds.
inline at::Tensor maybe_poison(at::Tensor t) {
  if (poison_outputs()) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) t.fill_(-1);
  }
  return t;
}

// A kernel's output tensor (at::empty, then maybe_poison). On Linux, a CPU output of 4 MiB or more is advised
// into transparent huge pages (madvise MADV_HUGEPAGE on its 2 MiB-aligned interior) before anything touches it:
// glibc maps a buffer that large afresh on every call (or gives it back to the system when it is freed), and the
// kernel's first writes then fault it in 4 KiB page by page. A 32 MiB output (MoBA's self pass at 32K tokens, H = 8,
// D = 64 in bf16) took 6.7 ms of faults a call, 1.5 ms as 2 MiB pages (Xeon VM, THP "madvise"). Where THP is
// "never" (or absent) the advice is refused and ignored; ATTNOPS_CPU_HUGE_PAGES=0 turns it off. Memory use is
// unchanged: only whole 2 MiB pages inside the tensor are advised.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Kernels index the head dim with stride 1; any other layout is taken as strides (no copy).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace attnops
