"""The C++ backends of decoding: csrc/cpu/kernels/decode_attention.cpp (the block map fused into the forward)."""

from attnops.core import backends, dispatch
from attnops.ops.decode import library as lib

dispatch.expect("decode_attention", "cpu")  # without the extension: the fallback (or a clear error), never silence
if backends.EXTENSION:
    dispatch.register("decode_attention", "cpu", lib.backend(lib.FWD, fused_map=True, paged=True))
