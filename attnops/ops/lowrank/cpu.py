"""The C++ backend of low-rank-key attention: csrc/cpu/kernels/lowrank_attention.cpp."""

from attnops.core import backends, dispatch
from attnops.ops.lowrank import library as lib

if backends.EXTENSION:
    dispatch.register("lowrank_key_attention", "cpu", lib.backend(lib.FWD))
