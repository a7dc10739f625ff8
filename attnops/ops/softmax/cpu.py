"""The C++ backend of the block-sparse core: csrc/cpu/kernels/block_sparse_attention.cpp (forward with the fused
block map, fused or two-pass backward)."""

from attnops.core import backends, dispatch
from attnops.ops.softmax import library as lib

dispatch.expect("block_sparse_attention", "cpu")  # without the extension: the fallback (or a clear error), never silence
if backends.EXTENSION:
    dispatch.register("block_sparse_attention", "cpu", lib.backend(lib.FWD, reads_bool_masks=True))
