"""Public functional API: one module per attention family."""

from attnops.ops._result import AttentionLseMapOutput, AttentionMapOutput, AttentionOutput
from attnops.ops.attention import attention, block_sparse_attention
from attnops.ops.decode import decode_attention
from attnops.ops.linear import LinearAttentionMapOutput, LinearAttentionOutput, linear_attention
from attnops.ops.lowrank import lowrank_key_attention
from attnops.ops.routed import moba_attention, moba_block_mask, predict_block_mask

__all__ = ["AttentionLseMapOutput", "AttentionMapOutput", "AttentionOutput", "LinearAttentionMapOutput",
           "LinearAttentionOutput", "attention", "block_sparse_attention", "decode_attention", "linear_attention",
           "lowrank_key_attention", "moba_attention", "moba_block_mask", "predict_block_mask"]
