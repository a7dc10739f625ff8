"""Build attnops and its C++/CUDA extension ``attnops._C``.

Install for development with ``pip install --no-build-isolation -e .`` (``make test`` does it):
an isolated build environment would pull a multi-GB CUDA torch.

Environment knobs:
  ATTNOPS_CPU_ARCH   ``-march=`` of the baseline code (default: the compiler's own, x86-64 / armv8-a).
                     The C++ kernels are built once per ISA level (generic, and on x86-64 with GCC
                     also avx2 and avx512) and the best level the CPU runs is chosen when the
                     extension loads (csrc/cpu/isa.h), so the build is portable by default.
  ATTNOPS_NO_CUDA=1  skip ``csrc/cuda`` even when torch and nvcc have CUDA.
  ATTNOPS_DEBUG=1    ``-O0 -g``.
  ATTNOPS_SKIP_EXTENSION=1  install the Python package only (the Makefile then builds the
                     extension in place with ``build_ext --inplace``, incrementally, once).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags():
    arch = os.environ.get("ATTNOPS_CPU_ARCH", "")
    return [f"-march={arch}"] if arch not in ("", "auto", "none") else []


def _extension():
    debug = os.environ.get("ATTNOPS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
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
            "nvcc": opt + ["-std=c++20", "--use_fast_math", "-DATTNOPS_WITH_CUDA",
                           "-gencode=arch=compute_80,code=sm_80",
                           "-gencode=arch=compute_90,code=sm_90"],
        }
        return cpp_extension.CUDAExtension(**kwargs)
    print("attnops: building the CPU extension only (torch has no CUDA or nvcc was not found)")
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return cpp_extension.CppExtension(**kwargs)


setup(
    name="attnops",
    version="0.1.0",
    description="Efficient attention kernels for PyTorch: block-sparse, linear, routed, MQA/GQA decoding, low-rank keys",
    packages=find_packages(include=["attnops", "attnops.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton>=3.2"],
        "bench": ["rich", "matplotlib", "numpy"],
        "transformers": ["transformers>=4.48"],
    },
    ext_modules=[] if os.environ.get("ATTNOPS_SKIP_EXTENSION") == "1" else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
