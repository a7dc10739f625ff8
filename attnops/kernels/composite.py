"""The ``composite`` backend: kernels written as vectorised PyTorch (ATen) ops, differentiable by
autograd and runnable on every device. It serves ops for which the backend of a device has no
kernel of its own (today: ``linear_attention`` on CPU, where its chunk form runs on the CPU's GEMM;
the Triton backend hands it non-causal linear attention, two GEMMs). Unlike ``reference``, nothing
here is N x N.
"""

from attnops.kernels.linear_chunk import linear_attention  # noqa: F401

AVAILABLE = True
UNAVAILABLE_REASON = ""
