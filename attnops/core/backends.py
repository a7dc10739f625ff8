"""What can run here: the C++ extension (the ``cpu`` backend, and ``cuda`` where it was built against a
CUDA torch), Triton (a GPU, or CPU tensors under ``TRITON_INTERPRET=1``), and the PyTorch backends
(``composite``, ``reference``), which run anywhere.

The families' backend modules ask this module before registering with the dispatcher; importing it
loads ``attnops._C`` (whose ``TORCH_LIBRARY_IMPL`` blocks add the C++ kernels to the operators that
``attnops.core.library`` defines).
"""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Optional

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# ATTNOPS_TRITON_AUTOTUNE=0 launches the first configuration of each kernel's table instead of
# timing them all: the test suite sets it on a GPU, where autotuning every test shape would take
# most of its time (correctness does not depend on the configuration; the benchmark harness checks
# the accuracy of the autotuned ones at full size).
AUTOTUNE = os.environ.get("ATTNOPS_TRITON_AUTOTUNE", "1") != "0"


def _spec_of(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module entry of None in sys.modules (import blocked)
        return None


# How to get the C++ kernels, for every message about their absence.
BUILD_HINT = ("build them from the source tree with `pip install --no-build-isolation .` (a C++ compiler and the "
              "torch you run with; `make build` for development): see README, Install")

try:
    from attnops import _C  # noqa: F401  (adds the C++ kernels to the operators)

    EXTENSION = True
    EXTENSION_REASON = ""
except ImportError as e:
    _C = None
    EXTENSION = False
    if _spec_of("attnops._C") is None:  # not built (a wheel without it, or a bare checkout)
        EXTENSION_REASON = f"the C++ kernels (attnops._C) are not built; {BUILD_HINT}"
    else:  # built, but against another torch / compiler runtime: say what the loader said
        EXTENSION_REASON = f"the C++ kernels (attnops._C) failed to load ({e}); rebuild them: {BUILD_HINT}"

try:
    import triton  # noqa: F401

    _TRITON_ERROR = ""
except ImportError as e:  # triton is an optional dependency (`pip install attnops[triton]`)
    _TRITON_ERROR = f"triton is not importable ({e})"

if _TRITON_ERROR:
    TRITON, TRITON_REASON = False, _TRITON_ERROR
elif not (torch.cuda.is_available() or INTERPRET):
    TRITON, TRITON_REASON = False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
else:
    TRITON, TRITON_REASON = True, ""


def cuda_kernel(qualname: str) -> bool:
    """Whether the extension has a CUDA kernel for ``attnops::<op>`` (built against a CUDA torch)."""
    return EXTENSION and torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")


# The CPU features that decide the kernels' speed (/proc/cpuinfo flag names), reported by cpu_isa().
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name`` line of /proc/cpuinfo (``flags``, ``vendor_id``, ...), its value; None where it cannot be
    read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    return set((cpuinfo_field("flags") or "").split())


def _cpu_bf16_units() -> bool:
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Read at import: a constant to torch.compile (reading /proc/cpuinfo inside a compiled region breaks the graph).
_CPU_BF16_UNITS = _cpu_bf16_units()


def cpu_bf16_matmul() -> bool:
    """Whether torch's bfloat16 matmuls run on this CPU's bf16 dot-product units: AVX512-BF16 or AMX on x86
    (/proc/cpuinfo), what oneDNN reports elsewhere (aarch64's BF16). Without them ATen's bf16 bmm is a scalar
    loop: a ``(1024, 64, 64)`` bmm took 188 ms against 10 ms in float32 on an AVX2-only Zen 3 VM, so code written
    in PyTorch (linear attention's chunk form) multiplies bf16 inputs in float32 there."""
    return _CPU_BF16_UNITS


def cpu_isa() -> dict:
    """What the C++ kernels run with: ``kernels``, the ISA level they run at (``amx``, ``avx512``, ``avx2`` or
    ``generic``: the best level this CPU runs, or the one ``ATTNOPS_CPU_ISA`` names; None without the
    extension), ``levels``, the levels this build has and this CPU can run (most portable first), and
    ``bf16_dot``, whether bfloat16 inputs multiply their tiles in bf16 on AVX512-BF16 at the avx512 / amx level
    (by default everywhere but at the avx512 level of an Intel CPU, where widening is faster;
    ``ATTNOPS_CPU_BF16_DOT=0`` / ``1`` forces it off / on), ``bf16_brgemm``, whether those products go through
    oneDNN's brgemm (the ``amx`` level: AMX tiles), and ``cpu``, which of :data:`ISA_FLAGS` this CPU has (from
    /proc/cpuinfo; empty where it cannot be read)."""
    flags = cpu_flags()
    return {"kernels": _C._cpu_isa() if EXTENSION else None,
            "levels": list(_C._cpu_isa_levels()) if EXTENSION else [],
            "bf16_dot": bool(_C._bf16_dot()) if EXTENSION else False,
            "bf16_brgemm": bool(_C._bf16_brgemm()) if EXTENSION else False,
            "cpu": [f for f in ISA_FLAGS if f in flags]}


def set_cpu_isa(level: str) -> str:
    """Run the C++ kernels at another ISA level (one of ``cpu_isa()["levels"]``; the suite runs each);
    returns the previous level. ``ATTNOPS_CPU_ISA=<level>`` chooses it for a whole process."""
    if not EXTENSION:
        raise RuntimeError(EXTENSION_REASON)
    return _C._set_cpu_isa(level)


def set_cpu_workspace_cache(nbytes: int) -> int:
    """The most bytes of scratch the C++ kernels keep between calls (their packed K / V panels, which a fresh
    allocation would map and fault in again on every call); default 64 MiB, ``ATTNOPS_CPU_WORKSPACE_MB`` sets it
    for a process. 0 frees what is kept and keeps nothing. Returns the previous setting."""
    if not EXTENSION:
        raise RuntimeError(EXTENSION_REASON)
    return _C._set_workspace_cache_bytes(int(nbytes))


def set_poison_outputs(enable: bool) -> bool:
    """Test aid: C++ kernels fill outputs with NaN at allocation. Returns the previous setting."""
    return _C._set_poison_outputs(enable) if EXTENSION else False
