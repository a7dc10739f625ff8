"""The benchmark harness itself: registry, an end-to-end tiny suite, the accuracy gate, the CLI."""

import csv
import json

import pytest
import torch

import attnops
from attnops.bench import registry
from attnops.bench.__main__ import main
from attnops.bench.cases import attention as attention_cases
from attnops.bench.registry import OPS, CaseSpec, Provider, expand_cases, load_suite
from attnops.bench.runner import run_case

PUBLIC_OPS = ["attention", "block_sparse_attention", "linear_attention", "moba_attention", "decode_attention",
              "lowrank_key_attention", "agent_attention", "aaren", "flow_attention", "lln_attention", "moh_attention",
              "regla_attention", "routing_attention", "sea_attention"]

TINY_SUITE = """
description = "tiny end-to-end suite (tests)"
device = "cpu"
threads = 1
repeats = 2
warmup = 0

[[cases]]
op = "attention"
B = 1
H = 2
Hkv = 1
N = [64, 128]
D = 32
causal = [false, true]
mode = ["fwd", "fwd+bwd"]
extras = false

[[cases]]
op = "block_sparse_attention"
B = 1
H = 2
N = 128
D = 32
params = { mask = "sliding_window", mask_args = { window = 40 }, block_size = 32 }
"""


def test_registry_lists_every_family_present():
    registry.families()
    for name in PUBLIC_OPS:
        if hasattr(attnops, name):
            assert name in OPS, f"attnops.{name} has no benchmark cases registered"
    assert {"dense", "sparse"} <= set(registry.families())


def test_every_shipped_suite_expands():
    from attnops.bench import context_parallel

    for name in registry.available_suites():
        suite = load_suite(name)
        if context_parallel.is_cp_suite(suite):  # ranks launched by the command: its own grid
            cases = context_parallel.expand(suite)
            assert cases and all({"world", "N", "H", "D"} <= set(c) for c in cases), name
            continue
        cases = expand_cases(suite, device="cpu")
        assert cases, f"suite {name} expands to no case"
        assert all(c.op in OPS for c in cases)


def test_tiny_suite_end_to_end(tmp_path, capsys):
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    out = tmp_path / "out"
    assert main(["--suite", str(suite), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the default table fits a 100-column terminal (output captured: not a terminal, the table's own width)
    assert "speedup" in printed and "TF/s eq/act" not in printed
    assert max(len(line) for line in printed.splitlines()) <= 100, printed
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["threads"] == 1 and data["environment"]["torch"] == torch.__version__
    assert data["environment"]["git_commit"]
    # the ISA level the kernels ran at, and the CPU's own flags (the tables say which machine)
    from attnops.core.backends import cpu_isa

    assert data["environment"]["cpu_kernels_isa"] == cpu_isa()["kernels"]
    assert data["environment"]["cpu_bf16_dot"] == (cpu_isa()["bf16_dot"] and cpu_isa()["kernels"] in ("avx512", "amx"))
    assert data["environment"]["cpu_bf16_brgemm"] == cpu_isa()["bf16_brgemm"]
    assert isinstance(data["environment"]["cpu_flags"], str)
    rows = data["results"]
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["ms"] > 0 and r["baseline"] == "sdpa" and r["speedup"] > 0
        assert r["err_max"] <= r["tolerance"]
        assert r["peak_mem_mb"] is not None
    sparse = [r for r in rows if r["op"] == "block_sparse_attention"]
    assert sparse[0]["density"] is not None and sparse[0]["flex_ms"] > 0
    with open(out / "results.csv") as f:
        lines = [line for line in f if not line.startswith("#")]
    table = list(csv.DictReader(lines))
    assert len(table) == 9 and {"case", "ms", "speedup", "err_max"} <= set(table[0])
    for png in ("time_vs_seqlen.png", "speedup_vs_density.png"):
        content = (out / png).read_bytes()
        assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 1000


def test_accuracy_gate_marks_a_wrong_op_failed(monkeypatch):
    def build_wrong(spec):
        prepared = attention_cases.build_attention(spec)
        good = prepared.op.run
        prepared.op = Provider(name="attnops", run=lambda st: good(st) * 1.001)
        return prepared

    monkeypatch.setitem(OPS, "wrong_attention", registry.OpBench(family="dense", build=build_wrong))
    spec = CaseSpec(op="wrong_attention", device="cpu", dtype="float32", mode="fwd",
                    shape=dict(B=1, H=2, Hkv=2, Sq=64, Sk=64, D=32), params={"extras": False})
    result = run_case(spec, threads=1, repeats=2)
    assert result.status == "FAILED" and "accuracy" in result.message
    assert result.speedup is None and result.timings == {} and result.tflops() is None
    ok = run_case(CaseSpec(op="attention", device="cpu", dtype="float32", mode="fwd", shape=spec.shape,
                           params={"extras": False}), threads=1, repeats=2)
    assert ok.status == "ok" and ok.speedup is not None


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--suite", "no_such_suite"], "unknown suite"),
        (["--suite", "quick", "--device", "cuda"], "CUDA is not available"),
        (["--suite", "quick", "--device", "tpu"], "--device"),
        (["--suite", "quick", "--seqlens", "1024,abc"], "integers"),
        (["--suite", "quick", "--seqlens", "0"], "positive"),
        (["--suite", "quick", "--ops", "nonexistent"], "unknown"),
        (["--suite", "quick", "--dtype", "int8"], "invalid choice"),
        (["--suite", "quick", "--threads", "-1"], "positive"),
    ],
)
def test_cli_rejects_bad_arguments(argv, words, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["--suite", "quick", "--list"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "suite quick" in out
    assert main(["--suite", "gpu", "--list"]) == 0  # listing a GPU suite needs no GPU
    assert "suite gpu" in capsys.readouterr().out


def test_wide_table_has_every_column(tmp_path, capsys):
    suite = tmp_path / "one.toml"
    suite.write_text(TINY_SUITE.split("[[cases]]")[0] + "[[cases]]" + TINY_SUITE.split("[[cases]]")[2])
    assert main(["--suite", str(suite), "--out", str(tmp_path / "out"), "--wide"]) == 0
    printed = capsys.readouterr().out
    for column in ("status", "baseline", "TF/s eq/act", "GB/s", "MiB", "max err", "flex"):
        assert column in printed, column


@pytest.mark.parametrize("params", [dict(), dict(gate="channel", normalize=True), dict(decay="retnet")],
                         ids=["plain", "gla-normalize", "retnet"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_case_passes_its_gate(params, mode):
    spec = CaseSpec(op="linear_attention", device="cpu", dtype="float32", mode=mode,
                    shape=dict(B=1, H=2, Hkv=1, Sq=150, Sk=150, D=32), params=params)
    result = run_case(spec, threads=1, repeats=1, warmup=0)
    assert result.status == "ok", result.message
    assert result.baseline == "sdpa" and result.accuracy.passed and result.flops_actual > 0


@pytest.mark.parametrize("shape", [dict(Sq=1, Sk=2048), dict(Sq=3, Sk=1000), dict(Sq=300, Sk=300)],
                         ids=["decode", "decode-3", "prefill"])
def test_lowrank_case_passes_its_gate_and_reports_the_error_vs_exact(shape):
    base = dict(B=1, H=4, Hkv=2, D=64)
    spec = CaseSpec(op="lowrank_key_attention", device="cpu", dtype="float32", mode="fwd",
                    shape={**base, **shape}, params=dict(rank_div=4, local=4))
    result = run_case(spec, threads=1, repeats=1, warmup=0)
    assert result.status == "ok", result.message
    assert result.accuracy.passed and result.baseline in ("dense decode", "attnops dense")
    assert 0 < result.approx_err < 0.2  # peaked synthetic attention: top N/8 of the keys carry most of it
    exact = CaseSpec(op="lowrank_key_attention", device="cpu", dtype="float32", mode="fwd",
                     shape={**base, **shape}, params=dict(rank_div=1, topk_div=1))
    assert run_case(exact, threads=1, repeats=1, warmup=0).approx_err < 1e-5  # every key: exact attention


@pytest.mark.parametrize("op", ["agent_attention", "aaren", "flow_attention", "lln_attention", "moh_attention",
                                "regla_attention", "routing_attention"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_composed_cases_pass_their_gate(op, mode):
    spec = CaseSpec(op=op, device="cpu", dtype="float32", mode=mode, shape=dict(B=1, H=4, Hkv=2, Sq=333, Sk=333, D=32),
                    params=dict(num_agents=7) if op == "agent_attention" else {})
    result = run_case(spec, threads=1, repeats=1, warmup=0)
    assert result.status == "ok", result.message
    assert result.baseline == "sdpa" and result.accuracy.passed and 0 < result.flops_actual < result.flops_dense


@pytest.mark.parametrize("params", [dict(leftpad=0.6), dict(page=16), dict(page=100)], ids=lambda p: str(p))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_layout_cases_pass_their_gate(params, dtype):
    """Left-padded and paged decode cases against the op on the contiguous cache holding the same keys: both
    compute one function (err/base is meaningful) and pass the accuracy gate against the float64 reference."""
    spec = CaseSpec(op="decode_attention", device="cpu", dtype=dtype, mode="fwd",
                    shape=dict(B=3, H=8, Hkv=2, Sq=1, Sk=700, D=64), params=params)
    result = run_case(spec, threads=1, repeats=1, warmup=0)
    assert result.status == "ok", result.message
    assert result.accuracy.passed and result.baseline in ("keys at start", "contiguous")
    assert result.accuracy.provider_err[result.baseline] < 1e-2  # the baseline computed the same function
