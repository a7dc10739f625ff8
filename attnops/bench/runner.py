"""Runs benchmark cases: correctness gate first, then interleaved timing, then peak memory."""

from __future__ import annotations

import gc
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from attnops.bench.accuracy import Accuracy, judge, max_abs_diff, sample_rows
from attnops.bench.registry import DTYPES, OPS, CaseSpec, Provider
from attnops.bench.timer import Timing, peak_memory_mb, rotating, time_interleaved

OP = "attnops"


@dataclass
class CaseResult:
    spec: CaseSpec
    status: str  # "ok" | "FAILED" (accuracy gate) | "error" (the op raised)
    message: str = ""
    timings: Dict[str, Timing] = field(default_factory=dict)
    memory_mb: Dict[str, Optional[float]] = field(default_factory=dict)
    accuracy: Optional[Accuracy] = None
    baseline: Optional[str] = None
    extras: List[str] = field(default_factory=list)
    flops_dense: float = 0.0
    flops_actual: float = 0.0
    density: Optional[float] = None
    bytes_moved: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    threads: int = 0
    approx_err: Optional[float] = None  # approximate ops: ||op - exact||_F / ||exact||_F on the sampled rows
    approx_err_max: Optional[float] = None  # and max |op - exact|

    def ms(self, name: str) -> Optional[float]:
        t = self.timings.get(name)
        return t.median if t else None

    @property
    def speedup(self) -> Optional[float]:
        """baseline time / op time, both medians of the same interleaved run; None unless the case
        passed its accuracy gate."""
        if self.status != "ok" or self.baseline is None:
            return None
        op, base = self.ms(OP), self.ms(self.baseline)
        return base / op if op and base else None

    def tflops(self, which: str = "dense") -> Optional[float]:
        ms = self.ms(OP) if self.status == "ok" else None
        flops = self.flops_dense if which == "dense" else self.flops_actual
        return flops / (ms * 1e-3) / 1e12 if ms else None

    @property
    def gbps(self) -> Optional[float]:
        ms = self.ms(OP) if self.status == "ok" else None
        return self.bytes_moved / (ms * 1e-3) / 1e9 if ms and self.bytes_moved else None

    copy_gbps: Optional[float] = None  # the run's copy bandwidth (set by run_cases for memory-bound cases)

    @property
    def bandwidth_fraction(self) -> Optional[float]:
        return self.gbps / self.copy_gbps if self.gbps and self.copy_gbps else None

    def row(self) -> dict:
        s = self.spec
        acc = self.accuracy
        r = {
            "case": s.name, "op": s.op, "family": s.family, "device": s.device, "dtype": s.dtype,
            "mode": s.mode, **s.shape, "params": s.params, "status": self.status, "message": self.message,
            "threads": self.threads, "ms": self.ms(OP), "ms_p20": _q(self.timings.get(OP), 0.2),
            "ms_p80": _q(self.timings.get(OP), 0.8), "baseline": self.baseline,
            "baseline_ms": self.ms(self.baseline) if self.baseline else None, "speedup": self.speedup,
            "tflops_dense_equiv": self.tflops("dense"), "tflops_actual": self.tflops("actual"),
            "gbps": self.gbps, "copy_gbps": self.copy_gbps, "bandwidth_fraction": self.bandwidth_fraction,
            "density": self.density,
            "peak_mem_mb": self.memory_mb.get(OP),
            "baseline_peak_mem_mb": self.memory_mb.get(self.baseline) if self.baseline else None,
            "err_max": acc.err_max if acc else None, "err_rel": acc.err_rel if acc else None,
            "ref_lowp_err": acc.ref_lp_err if acc else None, "tolerance": acc.tolerance if acc else None,
            "baseline_err_max": acc.provider_err.get(self.baseline) if acc and self.baseline else None,
            "err_ratio_vs_baseline": acc.ratio_to(self.baseline) if acc and self.baseline else None,
            "approx_err_rel": self.approx_err, "approx_err_max": self.approx_err_max,
            "notes": "; ".join(n for n in self.notes if n),
        }
        for name in self.extras:
            r[f"{name}_ms"] = self.ms(name)
            r[f"{name}_speedup_of_attnops"] = (self.ms(name) / self.ms(OP)
                                               if self.status == "ok" and self.ms(name) and self.ms(OP) else None)
            r[f"{name}_err_max"] = acc.provider_err.get(name) if acc else None
        return r


def _q(t: Optional[Timing], q: float) -> Optional[float]:
    return t.quantile(q) if t else None


def run_case(spec: CaseSpec, threads: int = 2, repeats: int = 7, warmup: int = 1, buffers: int = 3) -> CaseResult:
    torch.set_num_threads(threads)
    # Compiled providers (FlexAttention) recompile per case (a new mask_mod closure each time); past
    # Dynamo's recompile limit a later case would silently time eager flex, 40x slower. Reset.
    torch._dynamo.reset()
    result = CaseResult(spec=spec, status="ok", threads=threads)
    try:
        prepared = OPS[spec.op].build(spec)
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
        return _failed(result, "error", f"build: {type(e).__name__}: {e}")
    result.flops_dense, result.flops_actual = prepared.flops_dense, prepared.flops_actual
    result.density, result.bytes_moved = prepared.density, prepared.bytes_moved
    result.notes = list(prepared.notes)
    inputs = [prepared.make_inputs()]
    # Rotating buffers defeat caches; inputs far larger than any cache need no rotation (and three
    # copies of a 4 GB KV cache would not fit).
    if _nbytes(inputs[0]) < (256 << 20):
        inputs += [prepared.make_inputs() for _ in range(buffers - 1)]

    providers: List[Provider] = [prepared.op] + ([prepared.baseline] if prepared.baseline else []) + prepared.extras
    states: Dict[str, list] = {}
    outputs: Dict[str, torch.Tensor] = {}
    for p in providers:
        try:
            states[p.name] = [p.prepare(x) for x in inputs]
            outputs[p.name] = p.output(states[p.name][0], p.run(states[p.name][0])).detach()
        except Exception as e:  # noqa: BLE001
            if p is prepared.op:
                return _failed(result, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
            result.notes.append(f"{p.name} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            states.pop(p.name, None)
    providers = [p for p in providers if p.name in states]
    result.baseline = prepared.baseline.name if prepared.baseline and prepared.baseline.name in states else None
    result.extras = [p.name for p in prepared.extras if p.name in states]

    # Correctness gate: no speed is reported for an op that fails it.
    rows = sample_rows(prepared.num_rows)
    ref64 = prepared.reference(inputs[0], rows, torch.float64)
    ref_lp = prepared.reference(inputs[0], rows, DTYPES[spec.dtype])
    result.accuracy = judge(
        prepared.select_rows(outputs[OP], rows), ref64, ref_lp,
        {p.name: prepared.select_rows(outputs[p.name], rows) for p in providers if p.name != OP and p.same_function},
    )
    if prepared.exact is not None:
        exact = prepared.exact(inputs[0], rows).double()
        got = prepared.select_rows(outputs[OP], rows).detach().double().cpu()
        result.approx_err_max = max_abs_diff(got, exact)
        result.approx_err = float((got - exact).norm() / exact.norm().clamp(min=1e-300))
    del outputs
    if not result.accuracy.passed:
        return _failed(result, "FAILED", f"accuracy: max error {result.accuracy.err_max:.3e} > tolerance "
                                         f"{result.accuracy.tolerance:.3e}")

    calls = {p.name: rotating(p.run, states[p.name]) for p in providers}
    result.timings = time_interleaved(calls, spec.device, threads, repeats, warmup)
    for p in providers:
        first = states[p.name][0]
        result.memory_mb[p.name] = peak_memory_mb(lambda: p.run(first), spec.device)  # noqa: B023 (called here)
    del states, inputs
    gc.collect()
    return result


def _nbytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def copy_bandwidth_gbps(device: str, mbytes: int = 512, repeats: int = 7) -> float:
    """The memory bandwidth of a large tensor copy (read + write bytes per second, STREAM's
    convention), the yardstick of memory-bound cases; median of repeats."""
    x = torch.empty(mbytes << 18, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    timing = time_interleaved({"copy": lambda: y.copy_(x)}, device, torch.get_num_threads(), repeats, warmup=1)
    return 2 * x.numel() * 4 / (timing["copy"].median * 1e-3) / 1e9


def _failed(result: CaseResult, status: str, message: str) -> CaseResult:
    result.status, result.message = status, message
    return result


def run_cases(cases: List[CaseSpec], threads: int, repeats: int, warmup: int,
              on_result: Optional[Callable[[CaseResult], None]] = None) -> List[CaseResult]:
    results = []
    for spec in cases:
        r = run_case(spec, threads=threads, repeats=repeats, warmup=warmup)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def attach_copy_bandwidth(results: List[CaseResult], threads: int) -> Optional[float]:
    """Measures the copy bandwidth once per device that has memory-bound cases and attaches it."""
    by_device = {}
    for r in results:
        if r.bytes_moved and r.status == "ok":
            if r.spec.device not in by_device:
                torch.set_num_threads(threads)
                by_device[r.spec.device] = copy_bandwidth_gbps(r.spec.device)
            r.copy_gbps = by_device[r.spec.device]
    return next(iter(by_device.values()), None)
