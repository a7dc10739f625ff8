"""Context parallelism: attention over a sequence split across the ranks of a ``torch.distributed`` group
(gloo on CPU, NCCL on GPU).

    shard.py      shard / unshard: zigzag (causal-balanced) or contiguous layouts, padding
    attention.py  context_parallel_attention: exact softmax attention, forward and backward, point-to-point
                  transfers of only the key shards the global mask needs
    linear.py     context_parallel_linear_attention: causal linear attention by state passing (LASP-2)
"""

from attnops.distributed.attention import STATS, allgather_kv_attention, context_parallel_attention
from attnops.distributed.linear import context_parallel_linear_attention
from attnops.distributed.shard import LAYOUTS, chunk_length, local_positions, shard, unshard

__all__ = ["LAYOUTS", "STATS", "allgather_kv_attention", "chunk_length", "context_parallel_attention", "context_parallel_linear_attention",
           "local_positions", "shard", "unshard"]
