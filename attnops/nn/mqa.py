"""Multi-query / grouped-query attention block with KV-cache decoding."""

from __future__ import annotations

from typing import Optional

import torch

from attnops.kv_cache import KVCache
from attnops.nn.attention import Attention
from attnops.nn.specs import Dense
from attnops.ops.attention import attention
from attnops.ops.decode import MAX_NEW_TOKENS, decode_attention


class MultiQueryAttention(Attention):
    """Causal self-attention with ``num_kv_heads`` shared key/value heads (1: multi-query; between
    1 and ``num_heads``: grouped-query), for training and for generation with a KV cache.

    Args:
        embed_dim: model width E; ``head_dim = E / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads, dividing H (default 1).
        bias: biases on the projections.

    An :class:`attnops.nn.Attention` with the causal dense spec, plus the cache.

    ``forward(x)``, ``x (B, T, E)``: training / full-sequence forward through the block-sparse core
    (causal, differentiable). ``forward(x, cache=cache)``: appends the new tokens' keys and values to
    ``cache`` (from :meth:`make_cache`) and attends over it with :func:`attnops.decode_attention`
    (up to 64 new tokens; a longer prompt goes through :func:`attnops.attention` on the cached
    prefix, which needs all sequences at the same length).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int = 1, bias: bool = False, device=None,
                 dtype=None):
        super().__init__(embed_dim, num_heads, num_kv_heads, attention=Dense(causal=True), bias=bias, device=device,
                         dtype=dtype)
        self.embed_dim = embed_dim

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.k_proj.weight
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        if cache is None:
            return super().forward(x)
        q, k, v = self._qkv(x)
        k_cache, v_cache, lens = cache.append(k, v)
        if x.shape[1] <= MAX_NEW_TOKENS:
            out = decode_attention(q, k_cache, v_cache, lens)
        else:
            if int(lens.min()) != int(lens.max()):
                raise ValueError("a prompt longer than 64 tokens needs all cached sequences at one length")
            out = attention(q, k_cache, v_cache, causal=True)  # bottom-right: the prompt ends the cache
        return self._output(out)
