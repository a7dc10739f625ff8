// Dynamic task scheduling on top of at::parallel_for.
//
// at::parallel_for splits a range statically, one contiguous chunk per thread. Attention tasks
// have very unequal costs (causal: the last query tile reads every key, the first reads one
// tile; block-sparse rows differ by their block counts), so a static split leaves threads idle.
// Here each thread pulls tasks from a shared counter, costliest first (longest-processing-time
// order), which keeps every thread busy until the end.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

namespace attnops::cpu::ATTNOPS_ISA {

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more (measured at
// S = 16, H = 8 on 2 threads: 51 us a call with the pool against 36 us without).
constexpr int64_t kSerialWork = int64_t(1) << 21;

// Below this many elements a packing or summing pass around the kernels runs on the calling thread. An element
// costs what tens of multiply-adds do, so kSerialWork kept whole passes serial: the forward's K / V packing at
// N = 1024, H = 8, D = 128 (1M elements, ~0.3 ms) ran on one thread while the other waited (~13% of the bf16 call).
constexpr int64_t kSerialElems = int64_t(1) << 16;

// at::parallel_for's grain for `tasks` tasks of a pass over `elems` elements in all: all of them on the calling
// thread below kSerialElems, else one task a grain.
inline int64_t serial_grain(int64_t tasks, int64_t elems) { return elems < kSerialElems ? tasks : 1; }

// Pairs per wave, for `pairs` (b, kv head) pairs run in waves of about `most` at most (the waves' buffers' bound):
// the fewest waves, equal in size, rounded up to a multiple of `multiple` (past `most` by less than `multiple`; a
// backward task is a whole pair: 8 pairs in waves of 7 and 1 left a thread idle for a quarter of a 2-thread call).
inline int64_t even_waves(int64_t pairs, int64_t most, int64_t multiple = 1) {
  if (pairs <= 0) return 1;
  most = std::clamp<int64_t>(most, 1, pairs);
  const int64_t waves = (pairs + most - 1) / most;
  const int64_t wave = (pairs + waves - 1) / waves;
  return std::min(pairs, (wave + multiple - 1) / multiple * multiple);
}

// Runs work(task, scratch) for every task in [0, num_tasks). `cost(task)` orders the queue
// (heaviest first); make_scratch() builds one per-thread workspace. `work_per_cost`: multiply-adds per unit of
// cost, 0 when unknown; a call whose total is below kSerialWork stays on the calling thread.
template <typename Cost, typename MakeScratch, typename Work>
void run_tasks(int64_t num_tasks, Cost cost, MakeScratch make_scratch, Work work, int64_t work_per_cost = 0) {
  if (num_tasks <= 0) return;
  std::vector<int64_t> order(num_tasks);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::vector<int64_t> costs(num_tasks);
  int64_t total = 0;
  for (int64_t t = 0; t < num_tasks; ++t) total += costs[t] = cost(t);
  if (work_per_cost > 0 && total * work_per_cost < kSerialWork) {
    auto scratch = make_scratch();
    for (int64_t t = 0; t < num_tasks; ++t) work(t, scratch);
    return;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });

  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      auto scratch = make_scratch();
      for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) work(order[i], scratch);
    }
  });
}

}  // namespace attnops::cpu::ATTNOPS_ISA
