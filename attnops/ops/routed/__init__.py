"""Block-routed attention: routers that end in a ``BlockMask`` for the exact block-sparse core.

    op.py          MoBASpec: moba_attention, moba_block_mask (router kernel -> mask -> core)
    token.py       token-routed MoBA: packed (token, block) pairs on the core, merged by lse
    estimated.py   SEA: a linear-attention (Performer) estimate of the block map -> top-k mask -> core
    predictor.py   predict_block_mask, pooled_block_map: training-free (SpargeAttn-style)
    select.py      block means and the selection rules shared with nn.BlockGate (SeerAttention-style)
    library.py     the router operator from one argument list, fake, the dispatcher's entry
    reference.py   the float64 oracle (token and tile routing)
    cpu.py / triton.py   the router's backends
    composite.py   the router in PyTorch (the fallback without the extension)
"""

from attnops.core import backends
from attnops.ops.routed import composite, cpu, reference  # noqa: F401  (register with the dispatcher)
from attnops.ops.routed.estimated import estimate_block_map, sea_attention, sea_block_mask
from attnops.ops.routed.op import MOBA_KERNEL_BLOCK, check_moba_args, moba_attention, moba_block_mask
from attnops.ops.routed.predictor import pooled_block_map, predict_block_mask
from attnops.ops.routed.select import block_means, select_blocks

if backends.TRITON:
    from attnops.ops.routed import triton  # noqa: F401

__all__ = ["MOBA_KERNEL_BLOCK", "block_means", "check_moba_args", "estimate_block_map", "moba_attention",
           "moba_block_mask", "pooled_block_map", "predict_block_mask", "sea_attention", "sea_block_mask",
           "select_blocks"]
