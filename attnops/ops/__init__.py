"""Public functional API: one package per attention family (op, float64 reference, operators, kernels
of every backend, block maps), on the shared infrastructure of ``attnops.core``."""

from attnops.core.results import AttentionLseMapOutput, AttentionMapOutput, AttentionOutput
from attnops.ops.softmax import attention, block_sparse_attention, varlen_attention
from attnops.ops.lowrank import lowrank_key_attention
from attnops.ops.decode import KVCache, PagedKVCache, decode_attention
from attnops.ops.linear import LinearAttentionMapOutput, LinearAttentionOutput, linear_attention
from attnops.ops.routed import moba_attention, moba_block_mask, predict_block_mask, sea_attention
from attnops.ops.agent import agent_attention
from attnops.ops.aaren import AarenState, aaren
from attnops.ops.flow import flow_attention
from attnops.ops.lln import lln_attention
from attnops.ops.regla import regla_attention
from attnops.ops.moh import moh_attention
from attnops.ops.clustered import routing_attention
from attnops.ops.hyper import hyper_attention
from attnops.ops.landmark import landmark_attention

__all__ = ["AttentionLseMapOutput", "AttentionMapOutput", "AttentionOutput", "KVCache", "LinearAttentionMapOutput",
           "PagedKVCache", "AarenState", "aaren", "agent_attention", "flow_attention", "lln_attention",
           "LinearAttentionOutput", "attention", "block_sparse_attention", "decode_attention", "hyper_attention", "landmark_attention",
           "linear_attention",
           "lowrank_key_attention", "moba_attention", "moh_attention", "routing_attention", "moba_block_mask",
           "predict_block_mask", "regla_attention", "sea_attention", "varlen_attention"]
