"""The C++ kernels at each ISA level this CPU runs (csrc/cpu/isa.h), side by side with torch SDPA's CPU flash
kernel: dense and causal attention, forward and forward+backward, f32 and bf16, B=1 H=8, providers
interleaved, median of REPEATS after a warm-up call. Then the fixed per-call cost: a forward, and a forward+backward,
at S=16 (where the arithmetic is negligible), median of many calls, against SDPA's.

Run from the repository root: ``python benchmarks/cpu_isa.py [--quick]`` (``--quick``: N=1024 and 4096 at
D=64 only). ``--levels amx --seqlens 16384 --head-dims 128``: a part of the full table (hours at every level on 2
cores): only those columns, lengths and head dims. Prints a Markdown table; times in ms,
ratios are attnops / SDPA (below 1: attnops faster)."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnops  # noqa: E402
from attnops import _C  # noqa: E402
from attnops.core import backends  # noqa: E402

REPEATS = 5
# bf16 tile products on AVX512-BF16 (csrc/cpu/gemm_bf16.h): each level runs as it chooses by default (the avx512
# level of an Intel CPU widens), and the avx512 level's two forms get a column each where the CPU has them
DOT = "avx512_bf16" in backends.cpu_isa()["cpu"] and "avx512" in backends.cpu_isa()["levels"]
# Without an amx level here, the avx512 level with its bf16 products sent through the amx level's calls to oneDNN's
# brgemm (AVX-512 code on a CPU without AMX): what the amx level's calls cost, not what AMX gains.
def _brgemm_runs():
    try:
        _C._set_bf16_brgemm(_C._set_bf16_brgemm(1))  # refused where this torch's brgemm takes no bf16
    except RuntimeError:
        return False
    return True


BRGEMM = DOT and "amx" not in backends.cpu_isa()["levels"] and _brgemm_runs()


def _avx512_default_dot():
    """Whether the avx512 level multiplies bf16 tiles in bf16 when nothing forces it (off on Intel CPUs)."""
    if not DOT:
        return False
    previous = backends.set_cpu_isa("avx512")
    default = _C._bf16_dot()
    backends.set_cpu_isa(previous)
    return bool(default)


def _median_ms(times):
    return sorted(times)[len(times) // 2] * 1e3


def _providers(q, k, v, causal, backward, only=None):
    def ours(level, bf16_dot=-1, brgemm=-1):
        def run():
            backends.set_cpu_isa(level)
            if DOT:
                _C._set_bf16_dot(bf16_dot)
                _C._set_bf16_brgemm(brgemm)
            out = attnops.attention(q, k, v, causal=causal)
            if backward:
                out.backward(grad)
        return run

    def sdpa():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        if backward:
            out.backward(grad.transpose(1, 2))

    grad = torch.randn_like(q)
    runs = {level: ours(level) for level in backends.cpu_isa()["levels"] if level != "generic"}
    if DOT and q.dtype == torch.bfloat16:  # the avx512 level with its bf16 products off (widened) and on
        runs["avx512 widened"] = ours("avx512", bf16_dot=0)
        runs["avx512 bf16 dot"] = ours("avx512", bf16_dot=1)
        if BRGEMM:
            runs["avx512 brgemm"] = ours("avx512", brgemm=1)
    if only is not None:
        runs = {name: run for name, run in runs.items() if name in only}
    runs["sdpa"] = sdpa
    return runs


def _time(runs, repeats):
    for fn in runs.values():
        fn()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: _median_ms(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-call", action="store_true", help="only the fixed per-call cost at S=16")
    parser.add_argument("--levels", help="comma-separated columns to time (default: every level this CPU runs)")
    parser.add_argument("--seqlens", type=int, nargs="+", help="sequence lengths (default 1024 4096 16384)")
    parser.add_argument("--head-dims", type=int, nargs="+", help="head dims (default 64 128)")
    args = parser.parse_args()
    torch.manual_seed(0)
    isa = backends.cpu_isa()
    default = isa["kernels"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, levels {isa['levels']}, "
          f"CPU flags {' '.join(isa['cpu'])}")
    levels = [lv for lv in isa["levels"] if lv != "generic"] + (["avx512 widened", "avx512 bf16 dot"] if DOT else [])
    levels += ["avx512 brgemm"] if BRGEMM else []
    only = None
    if args.levels:
        asked = [name.strip() for name in args.levels.split(",")]
        unknown = sorted(set(asked) - set(levels))
        if unknown:
            parser.error(f"--levels: {unknown} not among this CPU's columns {levels}")
        levels = only = [lv for lv in levels if lv in asked]
    print(f"AVX512-BF16 at the avx512 level: {DOT}, bf16 products by default there: {_avx512_default_dot()} "
          "('avx512 widened' / 'avx512 bf16 dot': the level with them off / on; 'avx512 brgemm': on through "
          "oneDNN's brgemm, the amx level's calls, on a CPU without AMX; float32 rows leave those columns empty)")
    if args.per_call:
        _per_call(levels)
        backends.set_cpu_isa(default)
        return
    header = ["case", *[f"{lv} ms" for lv in levels], "sdpa ms", *[f"{lv} / sdpa" for lv in levels]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    seqlens, dims = ([1024, 4096], [64]) if args.quick else ([1024, 4096, 16384], [64, 128])
    seqlens, dims = args.seqlens or seqlens, args.head_dims or dims
    for backward in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for causal in (False, True):
                for D in dims:
                    for N in seqlens:
                        if backward and N > 4096:
                            continue
                        q, k, v = (torch.randn(1, N, 8, D, dtype=dtype, requires_grad=backward) for _ in range(3))
                        ms = _time(_providers(q, k, v, causal, backward, only), 3 if N > 4096 else REPEATS)
                        name = (f"{'causal' if causal else 'dense'} {'fwd+bwd' if backward else 'fwd'} "
                                f"{str(dtype).split('.')[1]} N={N} D={D}")
                        cells = [f"{ms[lv]:.1f}" if lv in ms else "" for lv in levels] + [f"{ms['sdpa']:.1f}"]
                        cells += [f"{ms[lv] / ms['sdpa']:.2f}" if lv in ms else "" for lv in levels]
                        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    _per_call(levels)
    backends.set_cpu_isa(default)
    if DOT:
        _C._set_bf16_dot(-1)
        _C._set_bf16_brgemm(-1)


def _per_call(levels):
    """Fixed per-call cost: S=16, where the arithmetic is a few microseconds, forward without gradients and
    forward+backward (a training step's call, its autograd included); the level is set once per batch of calls
    (setting it is not part of a call), batches of each provider alternate, median over all calls."""
    names = [lv for lv in levels if not lv.startswith("avx512 ")] + ["sdpa"]
    for backward in (False, True):
        q, k, v = (torch.randn(1, 16, 8, 64, requires_grad=backward) for _ in range(3))
        grad = torch.randn_like(q)

        def call(name):
            if name == "sdpa":
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True).transpose(1, 2)
            else:
                out = attnops.attention(q, k, v, causal=True)
            if backward:
                out.backward(grad)

        times = {name: [] for name in names}
        for _ in range(7):
            for name, samples in times.items():
                if name != "sdpa":
                    backends.set_cpu_isa(name)
                for _ in range(44):
                    start = time.perf_counter()
                    call(name)
                    samples.append(time.perf_counter() - start)
        print(f"\nper-call cost at S=16 H=8 D=64 causal f32 {'fwd+bwd' if backward else 'fwd'} "
              f"({torch.get_num_threads()} threads, median of 308): " +
              ", ".join(f"{name} {_median_ms(t) * 1e3:.0f} us" for name, t in times.items()))


if __name__ == "__main__":
    main()
