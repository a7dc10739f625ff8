"""The C++ backend of low-rank-key attention: csrc/cpu/kernels/lowrank_attention.cpp."""

from attnops.core import backends, dispatch
from attnops.ops.lowrank import library as lib

dispatch.expect("lowrank_key_attention", "cpu")  # without the extension: the fallback (or a clear error), never silence
if backends.EXTENSION:
    dispatch.register("lowrank_key_attention", "cpu", lib.backend(lib.FWD))
