"""pytest-benchmark entry point over the harness's suites and setup factories.

    pytest benchmarks --benchmark-only                       # the quick suite, attnops and baselines
    BENCH_SUITE=core pytest benchmarks --benchmark-only --benchmark-autosave
    pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run (another commit)

Cases come from attnops/bench/suites/<BENCH_SUITE>.toml through the same builders as
`python -m attnops.bench`, so both time exactly the same calls; providers of one case share a
benchmark group. The harness CLI adds what pytest-benchmark lacks: the accuracy gate, FLOP/s,
memory and the interleaved side-by-side ratio.
"""

import os

import pytest
import torch

from attnops.bench.registry import OPS, expand_cases, load_suite

SUITE = os.environ.get("BENCH_SUITE", "quick")
DEVICE = os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
CASES = expand_cases(load_suite(SUITE), device=DEVICE)


@pytest.mark.parametrize("provider", ["attnops", "baseline"])
@pytest.mark.parametrize("spec", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_bench(benchmark, spec, provider):
    torch.set_num_threads(load_suite(SUITE).get("threads", 2))
    prepared = OPS[spec.op].build(spec)
    p = prepared.op if provider == "attnops" else prepared.baseline
    if p is None:
        pytest.skip("no baseline for this case")
    state = p.prepare(prepared.make_inputs())
    benchmark.group = spec.label
    benchmark.extra_info.update(op=spec.op, provider=p.name, params=str(spec.params))
    if DEVICE.startswith("cuda"):
        def run():
            p.run(state)
            torch.cuda.synchronize()
    else:
        def run():
            p.run(state)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
