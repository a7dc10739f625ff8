// The extension's Python module (debug switches) and the state the kernels share. The operator schemas
// are defined in Python from one argument list per operator (attnops/core/library.py, the families'
// library.py), with their fakes and autograd; the kernels here only register implementations, per
// device, with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda). A kernel whose C++ signature does not fit its
// schema fails when the extension loads.
#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu/isa.h"
#include "ops.h"

namespace attnops {

namespace {
std::atomic<bool> g_poison_outputs{false};
std::atomic<int> g_backward_mode{0};
std::atomic<int64_t> g_wave_bytes{int64_t(16) << 20};
}  // namespace

int64_t forward_wave_bytes() { return g_wave_bytes.load(std::memory_order_relaxed); }

bool poison_outputs() { return g_poison_outputs.load(std::memory_order_relaxed); }

bool deterministic_schedule() {
  if (at::globalContext().deterministicAlgorithms()) return true;
  const char* env = std::getenv("ATTNOPS_DETERMINISTIC");
  return env != nullptr && env[0] != '\0' && std::string(env) != "0";
}
int backward_mode() { return g_backward_mode.load(std::memory_order_relaxed); }

namespace {
bool bf16_dot_default() {
  const char* env = std::getenv("ATTNOPS_CPU_BF16_DOT");
  if (env != nullptr && std::string(env) == "0") return false;
#if ATTNOPS_MULTI_ISA
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}
std::atomic<bool> g_bf16_dot{bf16_dot_default()};
}  // namespace

bool bf16_dot() { return g_bf16_dot.load(std::memory_order_relaxed); }

}  // namespace attnops

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnops C++/CUDA kernels; the operators live in torch.ops.attnops";
  m.def(
      "_set_poison_outputs",
      [](bool enable) { return attnops::g_poison_outputs.exchange(enable); },
      "Fill kernel outputs with NaN at allocation (test aid); returns the previous setting.");
  m.def(
      "_set_backward_mode",
      [](int mode) {
        TORCH_CHECK(mode >= 0 && mode <= 3,
                    "backward mode must be 0 (auto), 1 (fused), 2 (two-pass) or 3 (fused, key tiles split in 3)");
        return attnops::g_backward_mode.exchange(mode);
      },
      "CPU attention backward: 0 auto, 1 fused single pass, 2 two passes, 3 fused with each (batch, kv head)'s key "
      "tiles split in 3 tasks (test aid); returns the previous mode.");
  m.def(
      "_set_wave_bytes",
      [](int64_t bytes) {
        TORCH_CHECK(bytes >= 1, "wave bytes must be positive");
        return attnops::g_wave_bytes.exchange(bytes);
      },
      "CPU forward: K / V panel bytes per wave of (batch, kv head) pairs (test aid: 1 runs one pair per wave); "
      "returns the previous setting.");
  m.def(
      "_cpu_isa", [] { return std::string(attnops::cpu::active_kernels().name); },
      "The ISA level the CPU kernels run at (generic, avx2, avx512): the best this CPU supports, or "
      "ATTNOPS_CPU_ISA's.");
  m.def("_cpu_isa_levels", &attnops::cpu::runnable_levels,
        "The ISA levels this build has and this CPU can run, most portable first.");
  m.def(
      "_baseline_isa",
      [] {
#if defined(__AVX512F__)
        return std::string("avx512");
#elif defined(__AVX2__)
        return std::string("avx2");
#elif defined(__AVX__)
        return std::string("avx");
#elif defined(__x86_64__)
        return std::string("x86-64");
#else
        return std::string("other");
#endif
      },
      "The ISA of the build's baseline code (x86-64 unless ATTNOPS_CPU_ARCH raised it): what runs outside "
      "the ISA levels' kernels.");
  m.def(
      "_set_bf16_dot",
      [](bool enable) {
#if ATTNOPS_MULTI_ISA
        TORCH_CHECK(!enable || __builtin_cpu_supports("avx512bf16"), "this CPU lacks AVX512-BF16");
#else
        TORCH_CHECK(!enable, "the bf16 dot-product kernels are x86-64 (AVX512-BF16) only");
#endif
        return attnops::g_bf16_dot.exchange(enable);
      },
      "bfloat16 forward tile products in bf16 on AVX512-BF16 (at the avx512 level) or widened to float "
      "(test aid); returns the previous setting.");
  m.def("_bf16_dot", &attnops::bf16_dot, "Whether the bfloat16 forward multiplies in bf16 (AVX512-BF16).");
  m.def("_set_cpu_isa", &attnops::cpu::set_level,
        "Run the CPU kernels at another ISA level (test aid); returns the previous one.");
}
