"""Mixture-of-Head attention (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention"):
every token attends through its own subset of the heads, and the heads' outputs are summed with per-token
weights. Only the chosen (token, head) pairs are computed.

    op.py         moh_attention (the chosen rows packed, one call of the exact softmax core)
    routing.py    the two routers of the authors' code: learned gates (MoH-ViT / MoH-DiT) and the parameter-free
                  query-norm rule (MoH-LLaMA3)
    reference.py  the float64 oracle: every head dense, weighted
"""

from attnops.ops.moh.op import moh_attention
from attnops.ops.moh.routing import MoHGates, learned_head_gates, query_norm_heads

__all__ = ["MoHGates", "learned_head_gates", "moh_attention", "query_norm_heads"]
