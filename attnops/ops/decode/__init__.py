"""Decoding against a KV cache: split-KV ("flash-decoding") attention of up to 64 new queries.

    op.py         decode_attention (dense, block-mask and window decoding; low-rank keys via ops.lowrank)
    chunked.py    any number of new queries (a prompt through a cache, non-causal queries) as decode calls
    kv_cache.py   KVCache: preallocated buffers, one length per sequence
    paged_kv_cache.py  PagedKVCache: a pool of pages shared through a block table
    library.py    the decode operators from one argument list, fakes, the dispatcher's entry
    reference.py  the float64 oracle
    map.py        the block map as a second pass (Triton, CUDA); the C++ kernel fuses it
    cpu.py / triton.py / cuda.py   the backends
    composite.py  decoding in PyTorch (the fallback without the extension)
"""

from attnops.core import backends
from attnops.ops.decode import composite, cpu, cuda, reference  # noqa: F401  (register with the dispatcher)
from attnops.ops.decode.kv_cache import KVCache
from attnops.ops.decode.op import MAX_NEW_TOKENS, decode_attention
from attnops.ops.decode.paged_kv_cache import PagedKVCache

if backends.TRITON:
    from attnops.ops.decode import triton  # noqa: F401

__all__ = ["KVCache", "MAX_NEW_TOKENS", "PagedKVCache", "decode_attention"]
