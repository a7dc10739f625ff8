// The extension's Python module (debug switches) and the state the kernels share. The operator schemas
// are defined in Python from one argument list per operator (attnops/core/library.py, the families'
// library.py), with their fakes and autograd; the kernels here only register implementations, per
// device, with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda). A kernel whose C++ signature does not fit its
// schema fails when the extension loads.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

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

namespace {
// The workspace cache: idle buffers, their total at most g_cache_bytes. Never destroyed (a static
// at::Tensor would be freed after the allocator it came from may be gone at exit); the OS takes it back.
struct WorkspaceCache {
  std::mutex mutex;
  std::vector<at::Tensor> idle;
};
WorkspaceCache& workspace_cache() {
  static auto* cache = new WorkspaceCache();
  return *cache;
}
int64_t cache_bytes_default() {
  const char* env = std::getenv("ATTNOPS_CPU_WORKSPACE_MB");
  if (env == nullptr || env[0] == '\0') return int64_t(64) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0, "ATTNOPS_CPU_WORKSPACE_MB must be a whole number >= 0, got '",
              env, "'");
  return int64_t(mb) << 20;
}
std::atomic<int64_t> g_cache_bytes{-1};  // -1: not read from the environment yet (a bad value raises in the op)

// The cache's limit: ATTNOPS_CPU_WORKSPACE_MB's, read on first use, or the last _set_workspace_cache_bytes.
int64_t workspace_cache_bytes() {
  int64_t bytes = g_cache_bytes.load(std::memory_order_relaxed);
  if (bytes < 0) {
    const int64_t from_env = cache_bytes_default();
    g_cache_bytes.compare_exchange_strong(bytes, from_env);
    bytes = g_cache_bytes.load(std::memory_order_relaxed);
  }
  return bytes;
}

// Bytes the idle buffers hold (the cache's mutex held).
int64_t idle_bytes(const std::vector<at::Tensor>& idle) {
  int64_t n = 0;
  for (const auto& t : idle) n += t.nbytes();
  return n;
}

// Drops the smallest idle buffers until the rest fit `limit` (the cache's mutex held).
void trim_idle(std::vector<at::Tensor>& idle, int64_t limit) {
  while (!idle.empty() && idle_bytes(idle) > limit) {
    auto smallest = std::min_element(idle.begin(), idle.end(),
                                     [](const at::Tensor& a, const at::Tensor& b) { return a.nbytes() < b.nbytes(); });
    idle.erase(smallest);
  }
}
}  // namespace

void* Workspace::take(int64_t bytes) {
  TORCH_CHECK(!buffer_.defined(), "attnops: a Workspace is taken once");
  workspace_cache_bytes();  // reads ATTNOPS_CPU_WORKSPACE_MB on first use: a bad value raises here
  bytes = std::max<int64_t>(bytes, 1);
  {
    auto& cache = workspace_cache();
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto best = cache.idle.end();  // the smallest idle buffer that is large enough
    for (auto it = cache.idle.begin(); it != cache.idle.end(); ++it)
      if (static_cast<int64_t>(it->nbytes()) >= bytes && (best == cache.idle.end() || it->nbytes() < best->nbytes()))
        best = it;
    if (best != cache.idle.end()) {
      buffer_ = std::move(*best);
      cache.idle.erase(best);
    }
  }
  if (!buffer_.defined()) buffer_ = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  if (poison_outputs()) buffer_.fill_(0xFF);
  return buffer_.data_ptr();
}

Workspace::~Workspace() {
  if (!buffer_.defined()) return;
  const int64_t limit = workspace_cache_bytes();
  if (static_cast<int64_t>(buffer_.nbytes()) > limit) return;  // freed with buffer_
  auto& cache = workspace_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.idle.push_back(std::move(buffer_));
  trim_idle(cache.idle, limit);
}

namespace {
bool env_is_off(const char* name) {  // the switches on by default: "0" turns them off
  const char* env = std::getenv(name);
  return env != nullptr && std::string(env) == "0";
}
bool huge_pages_on() {
  static const bool on = !env_is_off("ATTNOPS_CPU_HUGE_PAGES");
  return on;
}
}  // namespace

bool key_classes_on() { return !env_is_off("ATTNOPS_CPU_KEY_CLASSES"); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.device().is_cpu() && t.nbytes() >= (size_t(4) << 20) && huge_pages_on()) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
    if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: may be refused
  }
#endif
  return maybe_poison(t);
}

bool deterministic_schedule() {
  if (at::globalContext().deterministicAlgorithms()) return true;
  const char* env = std::getenv("ATTNOPS_DETERMINISTIC");
  return env != nullptr && env[0] != '\0' && std::string(env) != "0";
}
int backward_mode() { return g_backward_mode.load(std::memory_order_relaxed); }

namespace {
int bf16_dot_env() {  // ATTNOPS_CPU_BF16_DOT=0 / 1 forces the bf16 products off / on; -1: the CPU's default
  const char* env = std::getenv("ATTNOPS_CPU_BF16_DOT");
  if (env != nullptr && std::string(env) == "0") return 0;
  if (env != nullptr && std::string(env) == "1") return 1;
  return -1;
}
std::atomic<int> g_bf16_dot{bf16_dot_env()};
}  // namespace

bool bf16_dot() {
  const int mode = g_bf16_dot.load(std::memory_order_relaxed);
  // forced on still needs the instructions: the kernels take this as their licence to execute VDPBF16PS
  return mode < 0 ? cpu::bf16_dot_by_default() : mode == 1 && cpu::has_avx512_bf16();
}

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
      "_set_workspace_cache_bytes",
      [](int64_t bytes) {
        TORCH_CHECK(bytes >= 0, "workspace cache bytes must be >= 0");
        const int64_t previous = attnops::workspace_cache_bytes();
        attnops::g_cache_bytes.store(bytes);
        auto& cache = attnops::workspace_cache();
        std::lock_guard<std::mutex> lock(cache.mutex);
        attnops::trim_idle(cache.idle, bytes);
        return previous;
      },
      "The most bytes of CPU kernel scratch kept between calls (default 64 MiB; 0 frees and disables the cache); "
      "returns the previous setting.");
  m.def(
      "_workspace_cached_bytes",
      [] {
        auto& cache = attnops::workspace_cache();
        std::lock_guard<std::mutex> lock(cache.mutex);
        return attnops::idle_bytes(cache.idle);
      },
      "Bytes of CPU kernel scratch the workspace cache holds now.");
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
      [](int mode) {
        TORCH_CHECK(mode >= -1 && mode <= 1, "bf16 products mode must be -1 (the CPU's default), 0 (off) or 1 (on)");
#if ATTNOPS_MULTI_ISA
        TORCH_CHECK(mode != 1 || attnops::cpu::has_avx512_bf16(), "this CPU lacks AVX512-BF16");
#else
        TORCH_CHECK(mode != 1, "the bf16 dot-product kernels are x86-64 (AVX512-BF16) only");
#endif
        return attnops::g_bf16_dot.exchange(mode);
      },
      "bfloat16 tile products in bf16 on AVX512-BF16 (the avx512 level's kernel, the amx level's brgemm): 1 on, "
      "0 widened to float, -1 the CPU's default (test aid; True / False pass as 1 / 0); returns the previous mode.");
  m.def("_bf16_dot", &attnops::bf16_dot, "Whether the bfloat16 forward multiplies in bf16 (AVX512-BF16).");
  m.def("_set_bf16_brgemm", &attnops::cpu::set_bf16_brgemm,
        "bf16 tile products through oneDNN's brgemm: -1 as the level says (the amx level), 0 off, 1 on (test aid: "
        "runs the amx level's calls on a CPU without AMX); returns the previous mode.");
  m.def("_bf16_brgemm", &attnops::cpu::bf16_brgemm,
        "Whether bf16 tile products (where the kernels multiply in bf16) call oneDNN's brgemm (AMX tiles).");
  m.def("_set_cpu_isa", &attnops::cpu::set_level,
        "Run the CPU kernels at another ISA level (test aid); returns the previous one.");
}
