"""A pytest plugin: every Triton launch of the test suite compiles for sm_90 (H100/H200) instead of running,
on a machine without a GPU, to find kernels the compiler refuses at the shapes and flags the tests use (the
interpreter accepts code the compiler refuses). The launches return without writing their outputs, so the
tests fail on their values: what matters is the kind of each failure, appended to OUT (default
triton_compile_sweep.txt) one line per test. Anything other than an assertion on the values, or a router's LUT
refused by the core (the router did not run either), is a finding.

    PYTHONPATH=benchmarks python -m pytest -p triton_compile_sweep tests -k triton-interpret -n 2 --tb=no
    sed 's/.* :: //' triton_compile_sweep.txt | cut -d: -f1 | sort | uniq -c

The compile-only driver is tests/core/test_triton_compiles.py's (which CI runs on a fixed set of calls)."""

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["ATTNOPS_TRITON_AUTOTUNE"] = "0"  # the configuration a launch without autotuning takes
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "tests" / "core"))
sys.path.insert(0, str(_ROOT))

import test_triton_compiles as _compiles  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

_compiles._compile_only(GPUTarget("cuda", 90, 32))
import attnops  # noqa: E402,F401

_compiles._triton_on_cpu_tensors()
os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py then runs its triton-interpret items (on the compiler)
_OUT = os.environ.get("OUT", "triton_compile_sweep.txt")


def pytest_runtest_logreport(report):
    if report.failed and report.when in ("setup", "call"):
        crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)[-300:]
        with open(_OUT, "a") as f:
            f.write(f"{report.nodeid} :: {message.splitlines()[0][:240] if message else ''}\n")
