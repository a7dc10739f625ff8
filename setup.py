"""Builds the C++/CUDA extension ``attnops._C`` (the package's metadata is in pyproject.toml).

The extension is compiled against the torch that is installed, so build without isolation:
``pip install --no-build-isolation .`` (``make build`` in a checkout: an editable install plus an
incremental ``build_ext --inplace``). A plain ``pip install .`` stops with a message that says so: its
isolated build environment has no torch, and installing one there would pull a multi-GB CUDA build.

Environment knobs:
  ATTNOPS_CPU_ARCH   ``-march=`` of the baseline code (default: the compiler's own, x86-64 / armv8-a).
                     The C++ kernels are built once per ISA level (generic, and on x86-64 with GCC
                     also avx2 and avx512) and the best level the CPU runs is chosen when the
                     extension loads (csrc/cpu/isa.h), so the build is portable by default.
  ATTNOPS_NO_CUDA=1  skip ``csrc/cuda`` even when torch and nvcc have CUDA.
  ATTNOPS_DEBUG=1    ``-O0 -g``.
  ATTNOPS_SKIP_EXTENSION=1  the Python package only (needs no torch to build): the ops run on the
                     pure-PyTorch fallback, with a warning (the Makefile builds the extension in place
                     after an editable install made this way).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags():
    arch = os.environ.get("ATTNOPS_CPU_ARCH", "")
    return [f"-march={arch}"] if arch not in ("", "auto", "none") else []


_NO_TORCH = """
attnops: torch is not importable here, and the C++ kernels are compiled against the torch you run with.
pip's isolated build environment has none (and installing one there would pull a multi-GB CUDA build).
Install torch first, then build against it:

    pip install --no-build-isolation .

or install without the C++ kernels (the pure-PyTorch fallback runs instead, several times slower):

    ATTNOPS_SKIP_EXTENSION=1 pip install .
"""


def _cpp_extension():
    try:
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(_NO_TORCH)
    return cpp_extension


def _extension(cpp_extension):
    debug = os.environ.get("ATTNOPS_DEBUG") == "1"
    # -g0 last: Python's own CFLAGS (which torch's builder passes first) carry -g, whose debug info made the
    # extension ~50 MB; the symbol table stays (tests/core/test_cpu_isa.py reads it)
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fopenmp on both compile and link: without it at::parallel_for runs on one thread.
    cxx = opt + ["-fopenmp", "-std=c++20", "-Wall", "-Wno-unused-function", "-Wno-psabi"] + _cpu_flags()
    # csrc/cpu/isa_<level>.cpp compile the kernels (csrc/cpu/kernels/*.cpp) once per ISA level
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # the kernels' .cpp files are included by each level's unit, not compiled on their own
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/cpu/kernels/*.cpp"))
    kwargs = dict(
        name="attnops._C",
        sources=sources,
        depends=depends,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    import torch

    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("ATTNOPS_NO_CUDA") != "1"
    )
    if use_cuda:
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"] = {
            "cxx": cxx + ["-DATTNOPS_WITH_CUDA"],
            "nvcc": (["-O0", "-g"] if debug else ["-O3"]) + ["-std=c++20", "--use_fast_math", "-DATTNOPS_WITH_CUDA",
                           "-gencode=arch=compute_80,code=sm_80",
                           "-gencode=arch=compute_90,code=sm_90"],
        }
        return cpp_extension.CUDAExtension(**kwargs)
    print("attnops: building the CPU extension only (torch has no CUDA or nvcc was not found)")
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return cpp_extension.CppExtension(**kwargs)


if os.environ.get("ATTNOPS_SKIP_EXTENSION") == "1":
    setup()
else:
    _cpp = _cpp_extension()
    setup(ext_modules=[_extension(_cpp)],
          cmdclass={"build_ext": _cpp.BuildExtension.with_options(use_ninja=True)})
