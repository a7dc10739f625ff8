"""attnops: efficient attention kernels for PyTorch.

Block-sparse, linear, block-routed, multi-query and low-rank-key attention on one block-sparse
flash core, with C++ (CPU), Triton and CUDA kernels behind one dispatcher.
"""

from attnops.core import dispatch
from attnops.core.masks import BlockMask
from attnops.ops import KVCache, PagedKVCache
from attnops.ops import (AarenState, AttentionLseMapOutput, AttentionMapOutput, AttentionOutput,
                         LinearAttentionMapOutput, LinearAttentionOutput, aaren, agent_attention, attention,
                         block_sparse_attention, decode_attention, flow_attention, hyper_attention, landmark_attention,
                         linear_attention, lln_attention, lowrank_key_attention, moba_attention, moba_block_mask,
                         moh_attention, predict_block_mask, regla_attention, routing_attention, sea_attention,
                         varlen_attention)
from attnops import lowrank  # noqa: E402  (KeyProjection, calibrate)
from attnops import maps  # noqa: E402  (block maps: capture, rollout, heatmaps)
from attnops import distributed  # noqa: E402  (context parallelism over torch.distributed)
from attnops import nn  # noqa: E402  (modules build on the ops above)
from attnops.nn import swap, unswap  # noqa: E402
from attnops.integrations import autoregister as _autoregister  # noqa: E402

_autoregister.install()  # attn_implementation="attnops" works once transformers loads, no register() call

__version__ = "0.1.0"

__all__ = ["AarenState", "AttentionLseMapOutput", "AttentionMapOutput", "AttentionOutput", "BlockMask", "KVCache",
           "LinearAttentionMapOutput", "LinearAttentionOutput", "aaren", "agent_attention", "attention",
           "block_sparse_attention", "decode_attention", "dispatch", "distributed", "flow_attention",
           "hyper_attention", "landmark_attention", "linear_attention", "lln_attention", "lowrank",
           "lowrank_key_attention", "maps", "moba_attention", "moba_block_mask", "moh_attention", "nn", "PagedKVCache",
           "predict_block_mask", "regla_attention", "routing_attention", "sea_attention", "swap", "unswap",
           "varlen_attention"]
