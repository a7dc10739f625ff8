"""The C++ CPU backend: thin wrappers over ``torch.ops.attnops.*`` (csrc/cpu).

Importing this module loads ``attnops._C`` (which registers the operators) and adds, in Python,
what the C++ side leaves out: fake (meta) implementations, so that ``torch.compile`` and meta
tensors work, and autograd formulas, which call the backward operators.
"""

from __future__ import annotations

import torch

from attnops.kernels import _registration as _reg

try:
    from attnops import _C  # noqa: F401  (registers torch.ops.attnops.*)

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except ImportError as e:  # not built: `make test` / `pip install --no-build-isolation -e .`
    _C = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the C++ extension attnops._C is not built ({e})"


def set_poison_outputs(enable: bool) -> bool:
    """Test aid: C++ kernels fill outputs with NaN at allocation. Returns the previous setting."""
    return _C._set_poison_outputs(enable) if AVAILABLE else False


if AVAILABLE:
    torch.library.register_fake("attnops::block_sparse_attn_fwd")(_reg.block_sparse_fwd_fake)
    torch.library.register_fake("attnops::block_sparse_attn_bwd")(_reg.block_sparse_bwd_fake)
    _reg.register_block_sparse_autograd("attnops::block_sparse_attn_fwd", torch.ops.attnops.block_sparse_attn_bwd,
                                        "attnops::block_sparse_attn_bwd")
    block_sparse_attention = _reg.block_sparse_backend(torch.ops.attnops.block_sparse_attn_fwd)

    torch.library.register_fake("attnops::decode_attn_fwd")(_reg.decode_fwd_fake)
    _reg.register_forward_only("attnops::decode_attn_fwd", "decode_attention")
    decode_attention = _reg.decode_backend(torch.ops.attnops.decode_attn_fwd, fused_map=True)

    torch.library.register_fake("attnops::moba_route")(_reg.moba_route_fake)
    moba_route = _reg.moba_route_backend(torch.ops.attnops.moba_route)

    torch.library.register_fake("attnops::lowrank_attn_fwd")(_reg.lowrank_fwd_fake)
    _reg.register_forward_only("attnops::lowrank_attn_fwd", "lowrank_key_attention")
    lowrank_key_attention = _reg.lowrank_backend(torch.ops.attnops.lowrank_attn_fwd)
