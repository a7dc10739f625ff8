"""The ``composite`` backend: kernels written as vectorised PyTorch (ATen) ops, differentiable by
autograd and runnable on every device. It serves ops for which the backend of a device has no
kernel of its own (today: ``linear_attention`` on CPU, where its chunk form runs on the CPU's GEMM,
and on GPUs until the Triton linear kernels land). Unlike ``reference``, nothing here is N x N.
"""

from attnops.kernels.linear_chunk import linear_attention  # noqa: F401

AVAILABLE = True
UNAVAILABLE_REASON = ""
