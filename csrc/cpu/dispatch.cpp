// The CPU kernels' dispatcher: one registered kernel per operator, forwarding to the table of the
// ISA level chosen at load time (cpu/isa.h). Compiled for the baseline target.
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
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
// Whether this torch's brgemm multiplies bf16 VNNI operands: ATen raises instead where it was built without
// oneDNN's ukernel API or its effective ISA is below AVX-512. One 1 x 32 x 2 product, once.
bool brgemm_runs() {
  static const bool ok = [] {
    try {
      c10::BFloat16 a[2] = {1.0f, 1.0f}, b[64];
      for (auto& x : b) x = 1.0f;
      float c[32];
      at::native::cpublas::brgemm(1, 32, 2, 2, 32, 32, false, a, b, c, /*is_vnni=*/true);
      at::native::cpublas::brgemm_release();
      return c[0] == 2.0f && c[31] == 2.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

#if ATTNOPS_MULTI_ISA
// GCC's checks include the OS's support of the register state (XCR0), not only cpuid's bits.
bool has_avx2() { return __builtin_cpu_supports("x86-64-v3"); }
bool has_avx512() { return __builtin_cpu_supports("x86-64-v4"); }
// AMX with bf16 tiles, AVX512-BF16 beside it (the level's own products use it where brgemm is not called), and the
// OS's permission to use the tile state, which at::cpu::init_amx() requests (Linux gives it per process on
// request; a CPU or kernel without it answers false).
bool has_amx_bf16() {  // cpuid leaf 7, EDX bit 22 (read directly: older GCCs' __builtin_cpu_supports lack "amx-bf16")
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1u);
}
bool has_amx() {  // once: init_amx() is a system call, and runnable_levels() asks on every cpu_isa()
  static const bool ok = has_avx512_bf16() && has_amx_bf16() &&
                         at::cpu::init_amx() && brgemm_runs();
  return ok;
}
// The amx level is the avx512 level's code with its bf16 tile products sent to oneDNN's brgemm
// (bf16_brgemm()), not a fourth compilation: brgemm brings the AMX instructions itself.
const CpuKernels amx_kernels = [] {
  CpuKernels k = avx512::kernels;
  k.name = "amx";
  return k;
}();
#endif

// From the most portable to the fastest; the default is the last one that runs here.
const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
      {"generic", &generic::kernels, &always},
#if ATTNOPS_MULTI_ISA
      {"avx2", &avx2::kernels, &has_avx2},
      {"avx512", &avx512::kernels, &has_avx512},
      {"amx", &amx_kernels, &has_amx},
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
      return "the amx level is x86-64 only (a GCC build); this build has " + level_names();
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

bool has_avx512_bf16() {
#if ATTNOPS_MULTI_ISA
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool bf16_dot_by_default() {
#if ATTNOPS_MULTI_ISA
  static const bool intel = __builtin_cpu_is("intel");
  return has_avx512_bf16() && (!intel || bf16_brgemm());
#else
  return false;
#endif
}

namespace {
std::atomic<int> g_bf16_brgemm{-1};  // -1: the level's choice; 0 / 1 forced (set_bf16_brgemm)
}

bool bf16_brgemm() {
  // torch.backends.mkldnn.enabled = False makes ATen's brgemm refuse VNNI operands: the level's own products run then
  const int forced = g_bf16_brgemm.load(std::memory_order_relaxed);
  const bool on = forced >= 0 ? forced == 1 : std::strcmp(active_kernels().name, "amx") == 0;  // per kernel call
  return on && at::globalContext().userEnabledMkldnn() && brgemm_runs();
}

int set_bf16_brgemm(int mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "bf16 brgemm mode must be -1 (the level's), 0 (off) or 1 (on)");
#if ATTNOPS_MULTI_ISA
  TORCH_CHECK(mode != 1 || (has_avx512_bf16() && brgemm_runs()),
              "the brgemm tile products need AVX-512 with AVX512-BF16 and a torch whose brgemm takes bf16");
#else
  TORCH_CHECK(mode != 1, "the brgemm tile products are x86-64 only");
#endif
  return g_bf16_brgemm.exchange(mode);
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
