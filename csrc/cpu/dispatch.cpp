// The CPU kernels' dispatcher: one registered kernel per operator, forwarding to the table of the
// ISA level chosen at load time (cpu/isa.h). Compiled for the baseline target.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/isa.h"

namespace attnops::cpu {
namespace {

struct Level {
  const char* name;
  const CpuKernels* kernels;
  bool (*runs_here)();
};

bool always() { return true; }
#if ATTNOPS_MULTI_ISA
// GCC's checks include the OS's support of the register state (XCR0), not only cpuid's bits.
bool has_avx2() { return __builtin_cpu_supports("x86-64-v3"); }
bool has_avx512() { return __builtin_cpu_supports("x86-64-v4"); }
#endif

// From the most portable to the fastest; the default is the last one that runs here.
const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
      {"generic", &generic::kernels, &always},
#if ATTNOPS_MULTI_ISA
      {"avx2", &avx2::kernels, &has_avx2},
      {"avx512", &avx512::kernels, &has_avx512},
#endif
  };
  return all;
}

const Level* find_level(const std::string& name) {
  for (const Level& level : levels())
    if (name == level.name) return &level;
  return nullptr;
}

std::string level_names() {
  std::string names;
  for (const Level& level : levels()) names += (names.empty() ? "" : ", ") + std::string(level.name);
  return names;
}

// Why `name` cannot run here, or "" when it can.
std::string unusable(const std::string& name) {
  const Level* level = find_level(name);
  if (level == nullptr) {
    if (name == "amx")
      return "the amx level (bf16/fp16 tile products on AMX) is not implemented yet; this build has " +
             level_names();
    return "unknown level '" + name + "': this build has " + level_names();
  }
  if (!level->runs_here()) return "this CPU lacks the instructions of level '" + name + "'";
  return "";
}

struct Choice {
  std::atomic<const CpuKernels*> kernels{nullptr};
  std::string error;  // set when ATTNOPS_CPU_ISA asked for a level that cannot run here
};

Choice& choice() {
  static Choice* c = [] {
    auto* c = new Choice;
    const char* env = std::getenv("ATTNOPS_CPU_ISA");
    if (env != nullptr && env[0] != '\0') {
      const std::string why = unusable(env);
      if (why.empty()) c->kernels = find_level(env)->kernels;
      else c->error = "ATTNOPS_CPU_ISA=" + std::string(env) + ": " + why;
      return c;
    }
    for (const Level& level : levels())
      if (level.runs_here()) c->kernels = level.kernels;
    return c;
  }();
  return *c;
}

// The registered kernel of operator field F: the active level's entry, called with the same arguments.
template <auto F>
struct Forward;
template <typename R, typename... A, R (*CpuKernels::*F)(A...)>
struct Forward<F> {
  static R call(A... args) { return (active_kernels().*F)(args...); }
};

}  // namespace

std::vector<std::string> runnable_levels() {
  std::vector<std::string> names;
  for (const Level& level : levels())
    if (level.runs_here()) names.emplace_back(level.name);
  return names;
}

const CpuKernels& active_kernels() {
  const CpuKernels* k = choice().kernels.load(std::memory_order_relaxed);
  TORCH_CHECK(k != nullptr, choice().error);
  return *k;
}

std::string set_level(const std::string& name) {
  const std::string why = unusable(name);
  TORCH_CHECK(why.empty(), "cannot run the CPU kernels at level '", name, "': ", why);
  const CpuKernels* previous = choice().kernels.exchange(find_level(name)->kernels);
  choice().error.clear();
  return previous != nullptr ? previous->name : "";
}

TORCH_LIBRARY_IMPL(attnops, CPU, m) {
  m.impl("block_sparse_attn_fwd", &Forward<&CpuKernels::block_sparse_attn_fwd>::call);
  m.impl("block_sparse_attn_bwd", &Forward<&CpuKernels::block_sparse_attn_bwd>::call);
  m.impl("decode_attn_fwd", &Forward<&CpuKernels::decode_attn_fwd>::call);
  m.impl("lowrank_attn_fwd", &Forward<&CpuKernels::lowrank_attn_fwd>::call);
  m.impl("moba_route", &Forward<&CpuKernels::moba_route>::call);
  m.impl("moba_token_select", &Forward<&CpuKernels::moba_token_select>::call);
  m.impl("moba_token_pairs", &Forward<&CpuKernels::moba_token_pairs>::call);
  m.impl("moba_token_merge", &Forward<&CpuKernels::moba_token_merge>::call);
}

}  // namespace attnops::cpu
