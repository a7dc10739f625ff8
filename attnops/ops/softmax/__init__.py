"""Exact softmax attention on the block-sparse core: dense (full / causal / sliding window, GQA) and
block-sparse (any ``BlockMask``).

    op.py         attention, block_sparse_attention: validate once, build the call, dispatch
    varlen.py     varlen_attention: flash_attn's packed layout (cu_seqlens) through segment bounds
    library.py    the core's operators from one argument list: fakes, autograd, the dispatcher's entry
    reference.py  the float64 oracle (token masks, NaN-convention contractions), N x N
    cpu.py        C++ kernels (csrc/cpu/kernels/block_sparse_attention.cpp)
    composite.py  pure PyTorch (query chunks, recomputing backward): the fallback without the extension
    dropout.py    the dropout mask's hash, shared by every backend and the oracle
    triton.py     Triton forward / backward; triton_map.py: the block-map pass
"""

from attnops.core import backends
from attnops.ops.softmax import composite, cpu, reference  # noqa: F401  (register with the dispatcher)
from attnops.ops.softmax.op import DEFAULT_MAP_BLOCK, attention, block_sparse_attention
from attnops.ops.softmax.varlen import varlen_attention

if backends.TRITON:
    from attnops.ops.softmax import triton  # noqa: F401

__all__ = ["DEFAULT_MAP_BLOCK", "attention", "block_sparse_attention", "varlen_attention"]
