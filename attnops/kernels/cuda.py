"""The CUDA backend: kernels in csrc/cuda, registered as the CUDA implementations of the attnops
operators when the extension is built against a CUDA torch. Today: split-KV decoding."""

from __future__ import annotations

import torch

from attnops.kernels import _registration as _reg
from attnops.kernels import cpu as _cpu  # loads attnops._C and the operators' fake/autograd rules


def _has_cuda_kernel(op: str) -> bool:
    return _cpu.AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


if not torch.cuda.is_available():
    AVAILABLE, UNAVAILABLE_REASON = False, "no CUDA device"
elif not _has_cuda_kernel("attnops::decode_attn_fwd"):
    AVAILABLE, UNAVAILABLE_REASON = False, "attnops._C was built without CUDA (torch without CUDA or no nvcc)"
else:
    AVAILABLE, UNAVAILABLE_REASON = True, ""
    decode_attention = _reg.decode_backend(torch.ops.attnops.decode_attn_fwd)
