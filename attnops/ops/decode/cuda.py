"""The CUDA backend of decoding: csrc/cuda (one warp per key row), registered when the extension was
built against a CUDA torch. The Triton kernel is the default on CUDA tensors; this one is the compiled
reference point (DESIGN.md, decoding)."""

from attnops.core import backends, dispatch
from attnops.ops.decode import library as lib

if backends.cuda_kernel(lib.FWD.qualname):
    dispatch.register("decode_attention", "cuda", lib.backend(lib.FWD, name="CUDA"))
