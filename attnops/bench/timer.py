"""Timing and peak memory of benchmark providers.

CPU: ``torch.utils.benchmark.Timer`` with a fixed thread count; the providers of a case are timed
*interleaved* (repeat 1 of every provider, then repeat 2, ...), so that the slow drifts of a shared
machine hit the op and its baseline alike: on the dev VM the same kernel's median moved by 2x
between runs while the ratio to SDPA measured side by side stayed within a few percent.
CUDA: ``triton.testing.do_bench`` (L2 flushed between calls) when Triton is importable, else CUDA
events. Each call rotates through a few input buffers so that caches do not flatter.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils import benchmark as tbench


@dataclass
class Timing:
    samples_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def rotating(run: Callable, states: Sequence) -> Callable[[], object]:
    """A no-argument callable that calls run on the next input buffer each time."""
    counter = [0]

    def call():
        state = states[counter[0] % len(states)]
        counter[0] += 1
        return run(state)

    return call


def time_interleaved(calls: Dict[str, Callable[[], object]], device: str, threads: int, repeats: int,
                     warmup: int = 1, min_sample_s: float = 0.05) -> Dict[str, Timing]:
    if device.startswith("cuda"):
        return {name: _time_cuda(fn, repeats, warmup) for name, fn in calls.items()}
    torch.set_num_threads(threads)
    timers, numbers = {}, {}
    for name, fn in calls.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        numbers[name] = max(1, math.ceil(min_sample_s / once))
        timers[name] = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name in calls:
            m = timers[name].timeit(numbers[name])
            samples[name].append(m.mean * 1e3)
    return {name: Timing(s) for name, s in samples.items()}


def _time_cuda(fn: Callable[[], object], repeats: int, warmup: int) -> Timing:
    try:
        from triton.testing import do_bench

        times = do_bench(fn, warmup=max(25, warmup), rep=max(100, 10 * repeats), return_mode="all")
        return Timing([float(t) for t in times])
    except ImportError:
        pass
    for _ in range(max(3, warmup)):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return Timing(samples)


def peak_memory_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Extra memory at the peak of one call, in MiB, counting what the call allocates and does not
    free before its peak (its outputs included). CUDA: allocator statistics. CPU: the torch
    profiler's allocation events (every tensor the c10 CPU allocator hands out, including those a
    C++ operator allocates with at::empty; small std::vector scratch of the CPU kernels is not
    seen). The process RSS high-water mark was tried first and read 0 whenever freed pages were
    reused."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / 2**20
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # kineto prints a line per profiler start/stop
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    except Exception:  # noqa: BLE001 - a platform without the profiler reports no memory
        return None
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20
