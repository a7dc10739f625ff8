"""Build attnops and its C++/CUDA extension ``attnops._C``.

Install for development with ``pip install --no-build-isolation -e .`` (``make test`` does it):
an isolated build environment would pull a multi-GB CUDA torch.

Environment knobs:
  ATTNOPS_CPU_ARCH   ``auto`` (default): ``-march=x86-64-v3`` (AVX2 + FMA + F16C) when the build
                     machine has those, else the compiler's baseline; ``native``; ``none``; or any
                     value for ``-march=``.
  ATTNOPS_NO_CUDA=1  skip ``csrc/cuda`` even when torch and nvcc have CUDA.
  ATTNOPS_DEBUG=1    ``-O0 -g``.
  ATTNOPS_SKIP_EXTENSION=1  install the Python package only (the Makefile then builds the
                     extension in place with ``build_ext --inplace``, incrementally, once).
"""

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags():
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    arch = os.environ.get("ATTNOPS_CPU_ARCH", "auto")
    if arch == "none":
        return []
    if arch != "auto":
        return [f"-march={arch}"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    # The kernels' vector width follows the target: 8 floats with AVX, 4 without.
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-march=x86-64-v3"]
    return []


def _extension():
    debug = os.environ.get("ATTNOPS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp on both compile and link: without it at::parallel_for runs on one thread.
    cxx = opt + ["-fopenmp", "-std=c++20", "-Wall", "-Wno-unused-function", "-Wno-psabi"] + _cpu_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True))
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
