"""Multi-query / grouped-query attention block with KV-cache decoding."""

from __future__ import annotations

from typing import Optional, Union

import torch

from attnops.ops.decode.kv_cache import KVCache
from attnops.ops.decode.paged_kv_cache import PagedKVCache
from attnops.ops.lowrank.projection import KeyProjection
from attnops.nn.attention import Attention
from attnops.nn.specs import SoftmaxSpec


class MultiQueryAttention(Attention):
    """Causal self-attention with ``num_kv_heads`` shared key/value heads (1: multi-query; between
    1 and ``num_heads``: grouped-query), for training and for generation with a KV cache.

    Args:
        embed_dim: model width E; ``head_dim = E / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads, dividing H (default 1).
        bias: biases on the projections.
        lowrank, rank, topk, local: low-rank-key (Loki) decoding of the cached steps
            (:meth:`attnops.nn.Attention.set_lowrank`).

    An :class:`attnops.nn.Attention` with the causal dense spec, plus the cache.

    ``forward(x)``, ``x (B, T, E)``: training / full-sequence forward through the block-sparse core
    (causal, differentiable). ``forward(x, cache=cache)``: appends the new tokens' keys and values to
    ``cache`` (from :meth:`make_cache`) and attends over it with :func:`attnops.decode_attention`
    (up to 64 new tokens; a longer prompt goes through :func:`attnops.attention` on the cached
    prefix, or with the sequences at different lengths, each sequence's keys packed: forward only).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int = 1, bias: bool = False, device=None,
                 dtype=None, lowrank: Optional[KeyProjection] = None, rank: Optional[int] = None,
                 topk: Optional[int] = None, local: int = 0):
        super().__init__(embed_dim, num_heads, num_kv_heads, attention=SoftmaxSpec(), bias=bias, device=device,
                         dtype=dtype, lowrank=lowrank, rank=rank, topk=topk, local=local, causal=True)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor, cache: Union[None, KVCache, PagedKVCache] = None,
                lengths=None) -> torch.Tensor:
        """``lengths``: with ``cache``, each sequence's new tokens, the last rows of ``x[b]`` (continuous batching:
        :meth:`attnops.nn.Attention.forward`)."""
        return super().forward(x, cache=cache, lengths=lengths)
